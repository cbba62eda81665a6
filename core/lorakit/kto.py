"""KTO (Kahneman-Tversky Optimization, Ethayarajh et al. 2024) over packed labelled answers.

A micro-batch is ``per_device_train_batch_size`` answers (each labelled desirable or
undesirable; :mod:`lorakit.data.unpaired`), packed into one padding-free row like an SFT batch;
each answer's log-probability is the sum over its answer tokens
(:func:`lorakit.preference.sequence_logps`).

The loss is TRL's ``kto`` loss (``trl/trainer/kto_trainer.py``, ``KTOTrainer._compute_loss``,
lines 1442-1548 of trl 1.16), checked against that code in ``tests/test_kto.py``: with
``r = π - ref`` an answer's log-ratio against the reference,

- desirable: ``w_d (1 - σ(β (r - z)))``; undesirable: ``w_u (1 - σ(β (z - r)))``;
- ``z``, the KL reference point: the mean over the micro-batch of ``π(y'|x) - ref(y'|x)`` on
  *mismatched* prompt/answer pairs, each prompt with the answer of the example before it in the
  micro-batch (TRL's rotation by one: ``(x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})``),
  averaged over the ranks, clamped at 0 and detached: it sets the reference point, no gradient
  flows through it;
- the reward (for the metrics) is ``β r``.

``kto_loss = "apo_zero_unpaired"`` is TRL's other KTO loss (APO-zero, D'Oosterlinck et al. 2024,
in its unpaired form): desirable ``w_d (1 - σ(β r))``, undesirable ``w_u σ(β r)``. That is the
``kto`` loss with the reference point fixed at ``z = 0`` (``1 - σ(-x) = σ(x)``), so it is computed
as such, and no mismatched rows are scored (the logged ``kl`` is 0, as in TRL).

The reference is the model as the run starts (the base, or the ``from_adapter`` it starts
from), as for DPO. The answers' own reference log-probabilities are computed once before
training (:func:`answer_reference_logps`, ``reference_logps = "once"``) or in each step, in the
step's own packed row (``"every_step"``, :class:`lorakit.preference.StepReference`); the
mismatched pairs change with every micro-batch, so theirs are always computed in the step,
without gradients, by the reference (the adapter switched off when it is fresh, else its
weights set back to their starting values for that forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lorakit.packing import IGNORE_INDEX
from lorakit.preference import (
    REFERENCE_TOKENS,
    Objective,
    StartWeights,
    StepReference,
    sequence_logps,
)


def _first_label(labels: Sequence[int]) -> int:
    return next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))


def mismatched_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The KL estimate's rows of a micro-batch: each answer's prompt (its tokens before the
    first supervised one) followed by the previous answer's answer tokens (the last answer's
    for the first), only those supervised. A micro-batch of one pairs the answer with itself,
    as TRL's rotation does."""
    out = []
    for i, row in enumerate(rows):
        other = rows[i - 1]
        p, q = _first_label(row["labels"]), _first_label(other["labels"])
        out.append(
            {
                "input_ids": [*row["input_ids"][:p], *other["input_ids"][q:]],
                "labels": [IGNORE_INDEX] * p + list(other["labels"][q:]),
            }
        )
    return out


def pack_answers(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate answer rows (from :class:`AnswerDataset`) into one packed row, with their labels,
    reference log-probabilities (when known) and the packed mismatched rows (``kl``)."""
    import torch

    from lorakit.packing import pack

    batch = pack([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    batch["kl"] = pack(mismatched_rows(rows))
    batch["desirable"] = torch.tensor([bool(r["desirable"]) for r in rows], dtype=torch.bool)
    batch["row_index"] = torch.tensor([r.get("index", -1) for r in rows], dtype=torch.long)
    batch["examples"] = torch.tensor(len(rows), dtype=torch.long)
    if all("reference" in r for r in rows):
        batch["reference"] = torch.tensor([r["reference"] for r in rows], dtype=torch.float32)
    return batch


class AnswerDataset:
    """Labelled answer rows as a map-style dataset; ``reference[i]``: answer ``i``'s reference
    log-probability."""

    def __init__(self, rows: Sequence[Any], reference: Sequence[float] | None = None):
        self.rows = rows
        self.reference = reference

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        out = {
            "input_ids": row.input_ids,
            "labels": row.labels,
            "desirable": row.desirable,
            "length": row.length,
            "index": i,
        }
        if self.reference is not None:
            out["reference"] = self.reference[i]
        return out


def kto_losses(
    objective: Objective, logps: Any, reference: Any, desirable: Any, kl: Any
) -> tuple[Any, Any]:
    """Per-answer KTO losses (weighted) and rewards ``β (π - ref)``; ``kl``: the detached,
    clamped reference point (:func:`kl_estimate`), 0 for ``apo_zero_unpaired``."""
    import torch

    o = objective
    ratio = logps - reference
    good = o.desirable_weight * (1 - torch.sigmoid(o.beta * (ratio - kl)))
    bad = o.undesirable_weight * (1 - torch.sigmoid(o.beta * (kl - ratio)))
    return torch.where(desirable, good, bad), o.beta * ratio.detach()


def kl_estimate(policy: Any, reference: Any) -> Any:
    """The mean log-ratio of the mismatched pairs, detached (before the clamp at 0, which comes
    after the mean over the ranks, as in TRL)."""
    return (policy - reference).mean().detach()


def mismatched_logps(
    model: Any, kl_batch: dict[str, Any], head_kwarg: bool, start: StartWeights | StepReference
) -> tuple[Any, Any]:
    """The mismatched rows' summed answer log-probabilities under the model as it is and under
    the reference (``start.applied()``), without gradients and in eval mode (no dropout). Call
    it before the step's own forward: the reference may swap the adapter's weights in place."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            policy, _ = sequence_logps(model, kl_batch, head_kwarg)
            with start.applied():
                reference, _ = sequence_logps(model, kl_batch, head_kwarg)
    finally:
        if was_training:
            model.train()
    return policy, reference


def answer_reference_logps(
    model: Any, rows: Sequence[Any], device: str, budget: int = REFERENCE_TOKENS
) -> list[float]:
    """Every answer's log-probability under ``model`` as it is now (the reference: the run's
    start), in eval mode and without gradients, the answers in order, as many to a batch as
    fit in ``budget`` tokens (:func:`lorakit.preference.reference_tokens`): batches that
    depend on the answers and the budget alone, so a resumed run computes the same values."""
    import torch

    from lorakit.attention import packed_attention
    from lorakit.loss import accepts_logits_to_keep
    from lorakit.packing import consecutive_batches, pack
    from lorakit.progress import bar

    if not rows:  # no val split: not even a switch to eval mode (transformers re-kernelizes)
        return []
    head_kwarg = accepts_logits_to_keep(model)
    target = next(model.parameters()).device
    batches = consecutive_batches([len(r.input_ids) for r in rows], budget)
    out: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), packed_attention(model, device):
            for part in bar(batches, desc="reference", unit="batch"):
                chunk = [rows[i] for i in part]
                batch = pack([{"input_ids": r.input_ids, "labels": r.labels} for r in chunk])
                batch = {k: v.to(target) if torch.is_tensor(v) else v for k, v in batch.items()}
                sums, _ = sequence_logps(model, batch, head_kwarg)
                out += sums.double().cpu().tolist()
    finally:
        if was_training:
            model.train()
    return out
