"""Preference objectives over packed pairs: DPO (sigmoid, IPO, hinge), SimPO and ORPO.

A micro-batch of pairs is one packed, padding-free row like an SFT batch
(``chosen_1, rejected_1, chosen_2, rejected_2, ...``; :func:`pack_pairs`), so both sides of a
pair are always in the same micro-batch. The model computes logits only at the answer positions
(``logits_to_keep``, as in :func:`lorakit.loss.supervised_nll`); each sequence's log-probability
is the sum over its answer tokens (:func:`sequence_logps`).

The losses (:func:`pair_losses`) are written from the papers and checked against TRL's
``DPOTrainer`` formulas in ``tests/test_preference_loss.py``:

- DPO sigmoid: ``-(1-ls) log σ(β d) - ls log σ(-β d)``, ``d = (π_c - ref_c) - (π_r - ref_r)``
  (``ls``: conservative DPO's label smoothing; TRL's ``sigmoid`` at ``ls = 0``);
- DPO IPO: ``(d / n - 1 / 2β)^2`` with each side's log-ratio divided by its answer tokens
  (TRL's normalization); hinge: ``relu(1 - β d)``;
- SimPO: reference-free, length-normalized: ``-log σ(β (π_c/n_c - π_r/n_r) - γ)``;
- ORPO: reference-free, ``NLL(chosen) - λ log σ(log odds_c - log odds_r)`` over
  length-normalized log-probabilities; the NLL is each pair's mean over its chosen tokens
  (TRL averages over the batch's tokens), so the loss does not depend on how pairs are grouped.

Rewards (for the metrics) are TRL's: ``β (π - ref)`` for DPO, ``β π/n`` for SimPO, ``λ π/n`` for
ORPO.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import attrs

from lorakit.loss import supervised_token_nll


@attrs.frozen
class Objective:
    """The recipe's preference objective and its settings (``[train]``)."""

    name: str  # dpo, orpo, simpo, kto
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    desirable_weight: float = 1.0  # kto (lorakit.kto)
    undesirable_weight: float = 1.0
    kto_loss: str = "kto"  # or apo_zero_unpaired

    @property
    def needs_reference(self) -> bool:
        return self.name in ("dpo", "kto")

    @classmethod
    def from_train(cls, train: Any) -> Objective:
        return cls(
            name=train.objective,
            beta=train.beta if train.beta is not None else 0.1,
            loss_type=train.loss_type,
            label_smoothing=train.label_smoothing,
            simpo_gamma=train.simpo_gamma,
            orpo_lambda=train.orpo_lambda,
            desirable_weight=train.desirable_weight,
            undesirable_weight=train.undesirable_weight,
            kto_loss=train.kto_loss,
        )


def shared_prompt_length(row: dict[str, Any]) -> int:
    """How many leading tokens a pair's two sides can share in a packed row: their common
    prefix, up to the position before the first supervised one (the last prompt token predicts
    the first answer token, whose target differs between the sides, so each side keeps it)."""
    chosen, rejected = row["chosen_ids"], row["rejected_ids"]
    first = min(_first_label(row["chosen_labels"]), _first_label(row["rejected_labels"]))
    n = 0
    limit = min(len(chosen), len(rejected), first - 1)
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    return n


def _first_label(labels: Sequence[int]) -> int:
    from lorakit.packing import IGNORE_INDEX

    return next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))


def pack_pairs(rows: Sequence[dict[str, Any]], share_prompt: bool = False) -> dict[str, Any]:
    """Collate pair rows (from :class:`PairDataset`) into one packed row, chosen then rejected
    for each pair, with each pair's reference log-probabilities when it has them.

    ``share_prompt``: each pair's prompt is in the row once: ``prompt + chosen answer``, then
    the rejected answer alone, its positions continuing the prompt's and its attention reaching
    back to the prompt (``pair_prompt_lens``: how many tokens each pair shares; the attention
    function reads it, :mod:`lorakit.attention`). The same log-probabilities as two whole
    sequences (causal attention: a prompt token never sees an answer), for a third fewer
    tokens when answers are short (the demo's pairs: 182 -> 121 a pair). Only for ``lorakit_varlen`` attention on CPU
    (:func:`shares_prompt`)."""
    import torch

    from lorakit.packing import pack

    prompt_lens = [shared_prompt_length(row) if share_prompt else 0 for row in rows]
    flat = []
    for row, n in zip(rows, prompt_lens, strict=True):
        flat.append({"input_ids": row["chosen_ids"], "labels": row["chosen_labels"]})
        flat.append({"input_ids": row["rejected_ids"][n:], "labels": row["rejected_labels"][n:]})
    batch = pack(flat)
    if any(prompt_lens):
        # a rejected answer's positions continue its prompt (its shifted targets already are
        # the whole sequence's from position n on)
        positions, start = batch["position_ids"][0], 0
        for row, n in zip(rows, prompt_lens, strict=True):
            start += len(row["chosen_ids"])
            end = start + len(row["rejected_ids"]) - n
            positions[start:end] += n
            start = end
        batch["pair_prompt_lens"] = torch.tensor(prompt_lens, dtype=torch.int32)
    batch["row_index"] = torch.tensor([row.get("index", -1) for row in rows], dtype=torch.long)
    batch["pairs"] = torch.tensor(len(rows), dtype=torch.long)
    if all("reference" in row for row in rows):
        batch["reference"] = torch.tensor(
            [v for row in rows for v in row["reference"]], dtype=torch.float32
        )
    return batch


def shares_prompt(device: str) -> bool:
    """Whether pairs are packed with their prompt once (:func:`pack_pairs`) on ``device``:
    on CPU, where lorakit's own packed attention runs. A GPU may run flash-attention's varlen
    kernel, which knows nothing of a shared prompt, so there each side is whole."""
    return device == "cpu"


class PairDataset:
    """Pair rows as a map-style dataset; ``reference[i]`` is pair ``i``'s (chosen, rejected)
    reference log-probabilities."""

    def __init__(self, rows: Sequence[Any], reference: Sequence[tuple[float, float]] | None = None):
        self.rows = rows
        self.reference = reference

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        out = {
            "chosen_ids": row.chosen.input_ids,
            "chosen_labels": row.chosen.labels,
            "rejected_ids": row.rejected.input_ids,
            "rejected_labels": row.rejected.labels,
            "length": row.length,
            "index": i,
        }
        if self.reference is not None:
            out["reference"] = self.reference[i]
        return out


def sequence_logps(model: Any, batch: dict[str, Any], head_kwarg: bool = True) -> tuple[Any, Any]:
    """Each packed sequence's summed log-probability of its supervised targets, and how many
    targets it has (float32 tensors, one entry per sequence). Logits are computed only at the
    supervised positions."""
    import torch

    nll, keep = supervised_token_nll(model, batch, head_kwarg)
    token_logps = -nll
    bounds = batch["cu_seq_lens_q"].to(keep.device).long()
    n_seq = bounds.numel() - 1
    # which sequence each kept position belongs to: positions are sorted, so a search suffices
    seq = torch.searchsorted(bounds[1:], keep, right=True)
    sums = torch.zeros(n_seq, dtype=torch.float32, device=keep.device).index_add(
        0, seq, token_logps
    )
    counts = torch.zeros(n_seq, dtype=torch.float32, device=keep.device).index_add(
        0, seq, torch.ones_like(token_logps)
    )
    if "row_prefix_len" in batch:  # the first sequence is a prefix the others share
        return sums[1:], counts[1:]
    return sums, counts


def _log1mexp(x: Any) -> Any:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and far from it."""
    import math

    import torch

    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_losses(
    objective: Objective,
    logps: Any,
    counts: Any,
    reference: Any | None,
) -> tuple[Any, Any, Any]:
    """Per-pair losses and the chosen/rejected rewards.

    ``logps``/``counts``: per sequence (chosen, rejected, chosen, ...) summed answer
    log-probabilities and answer tokens; ``reference``: the reference's ``logps`` (DPO).
    """
    import torch.nn.functional as F

    pc, pr = logps[0::2], logps[1::2]
    nc, nr = counts[0::2].clamp(min=1), counts[1::2].clamp(min=1)
    o = objective
    ls = o.label_smoothing
    if o.name == "dpo":
        if reference is None:
            raise ValueError("DPO needs the reference model's log-probabilities")
        rc, rr = reference[0::2], reference[1::2]
        ratio_c, ratio_r = pc - rc, pr - rr
        d = ratio_c - ratio_r
        if o.loss_type == "sigmoid":
            loss = -(1 - ls) * F.logsigmoid(o.beta * d) - ls * F.logsigmoid(-o.beta * d)
        elif o.loss_type == "ipo":
            loss = (ratio_c / nc - ratio_r / nr - 1 / (2 * o.beta)) ** 2
        elif o.loss_type == "hinge":
            loss = F.relu(1 - o.beta * d)
        else:
            raise ValueError(f"unknown DPO loss_type {o.loss_type!r}")
        return loss, o.beta * ratio_c.detach(), o.beta * ratio_r.detach()
    ac, ar = pc / nc, pr / nr
    if o.name == "simpo":
        z = o.beta * (ac - ar) - o.simpo_gamma
        loss = -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
        return loss, o.beta * ac.detach(), o.beta * ar.detach()
    if o.name == "orpo":
        log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
        loss = -ac - o.orpo_lambda * F.logsigmoid(log_odds)
        return loss, o.orpo_lambda * ac.detach(), o.orpo_lambda * ar.detach()
    raise ValueError(f"unknown preference objective {o.name!r}")


# A reference batch's packed tokens at most: large enough that the matmuls run at the machine's
# rate (24 demo pairs: 2.5 s in batches of 4 pairs, 2.2 s in one; fp32, 2-core Xeon).
REFERENCE_TOKENS = 4096


def reference_tokens(train: Any) -> int:
    """The token budget of a reference batch for a ``[train]`` section: :data:`REFERENCE_TOKENS`,
    and never more than a training micro-batch can hold (``per_device_train_batch_size``
    pairs, or KTO answers with their mismatched rows, of up to twice ``max_length``): a
    forward without gradients over as many tokens as a training step's then needs less memory
    than the step, which keeps its activations. Neither setting may change on a resume, so
    a resumed run packs the same batches."""
    return min(REFERENCE_TOKENS, 2 * train.per_device_train_batch_size * train.max_length)


def reference_logps(
    model: Any,
    rows: Sequence[Any],
    device: str,
    budget: int = REFERENCE_TOKENS,
    share_prefix: bool = False,
) -> list[tuple[float, float]]:
    """The (chosen, rejected) log-probabilities of every pair under ``model`` as it is now, in
    eval mode and without gradients: the reference a DPO run compares against, computed once
    before training (the starting adapter: a fresh one equals the base model exactly, since its
    B matrices are zero; a ``from_adapter`` run's is the SFT adapter). Pairs go in order, as
    many to a batch as fit in ``budget`` packed tokens (:func:`reference_tokens`): the batches
    depend on the pairs and the budget alone (not on a setting a resume may change), so a
    resumed run computes the same values. ``share_prefix``: each batch's common prompt prefix
    once (:mod:`lorakit.prefix_sharing`), as the run's training rows do."""
    import torch

    from lorakit.attention import packed_attention
    from lorakit.loss import accepts_logits_to_keep
    from lorakit.packing import consecutive_batches
    from lorakit.prefix_sharing import share_row_prefix
    from lorakit.progress import bar

    if not rows:  # no val split: not even a switch to eval mode (transformers re-kernelizes)
        return []
    head_kwarg = accepts_logits_to_keep(model)
    data = PairDataset(rows)
    share = shares_prompt(device)
    pairs = [data[i] for i in range(len(rows))]
    tokens = [
        len(p["chosen_ids"]) + len(p["rejected_ids"]) - (shared_prompt_length(p) if share else 0)
        for p in pairs
    ]
    out: list[tuple[float, float]] = []
    was_training = model.training
    model.eval()
    # an adapter that adds exactly nothing (a fresh one) need not be computed at all
    off = model.disable_adapter() if adds_nothing(model) else contextlib.nullcontext()
    try:
        with torch.no_grad(), packed_attention(model, device), off:
            for part in bar(consecutive_batches(tokens, budget), desc="reference", unit="batch"):
                batch = pack_pairs([pairs[i] for i in part], share_prompt=share)
                if share_prefix:
                    batch = share_row_prefix(batch)
                batch = {
                    k: v.to(_device(model)) if torch.is_tensor(v) else v for k, v in batch.items()
                }
                sums, _ = sequence_logps(model, batch, head_kwarg)
                values = sums.double().cpu().tolist()
                out += list(zip(values[0::2], values[1::2], strict=True))
    finally:
        if was_training:
            model.train()
    return out


def adds_nothing(model: Any) -> bool:
    """Is ``model`` a PEFT LoRA model whose adapter adds exactly zero: every ``lora_B`` tensor
    zero (PEFT's default init) and nothing else trainable that would change the output (DoRA's
    magnitudes, modules_to_save)? Then the base alone computes the same values, bit for bit."""
    if not hasattr(model, "disable_adapter"):
        return False
    adapter = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not adapter or any("lora_A" not in n and "lora_B" not in n for n, _ in adapter):
        return False
    return all(not bool(p.detach().any()) for n, p in adapter if "lora_B" in n)


def _device(model: Any) -> Any:
    return next(model.parameters()).device


class StartWeights:
    """The adapter's trainable weights as the run starts, to compute the reference model's
    log-probabilities in a step: :meth:`applied` sets them for one forward without gradients,
    then puts the trained values back. A fresh LoRA adapter's start is the base model exactly
    (its B matrices are zero); a ``from_adapter`` run's is the adapter it started from."""

    def __init__(self, model: Any):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.start = [p.detach().clone() for p in self.params]

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        import torch

        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.start, strict=True):
                p.copy_(s)
            try:
                yield
            finally:
                for p, t in zip(self.params, trained, strict=True):
                    p.copy_(t)


class StepReference:
    """The reference model inside a training step (``train.reference_logps = "every_step"``).

    Built from the model as the run starts (before any step, also when a run resumes: the
    Trainer loads a checkpoint's weights after it is built): a fresh adapter adds exactly
    nothing, so the reference is the model with the adapter switched off (no LoRA branch, and
    no copy of the weights); otherwise (a ``from_adapter`` start) the adapter's starting weights
    are kept and set back for each reference forward (:class:`StartWeights`).

    :meth:`logps` scores the step's own packed row, so the reference sees the same matmul shapes
    as the policy and, in bf16, rounds the same way: with a fresh adapter, the first step's
    policy and reference log-probabilities are the same bits in fp32 and bf16, with LoRA, 4-bit
    and 8-bit bases (``tests/test_step_reference.py``), where a reference computed once in other
    batches differs by up to ~1 nat in bf16 (docs/preference.md). A ``from_adapter`` start
    differs from the policy by the policy's LoRA dropout only."""

    def __init__(self, model: Any):
        self.model = model
        self.start = None if adds_nothing(model) else StartWeights(model)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model is the reference inside this block (call it without gradients)."""
        if self.start is None:
            with self.model.disable_adapter():
                yield
        else:
            with self.start.applied():
                yield

    def logps(self, batch: dict[str, Any], head_kwarg: bool) -> Any:
        """The reference's summed answer log-probabilities of ``batch``, without gradients
        and without dropout, in the arithmetic the policy computes in now (a training step's,
        or evaluation's). Call it before the policy's own forward: a ``from_adapter``
        reference swaps the adapter's weights in place."""
        import torch

        from lorakit.fused_lora import training_arithmetic_without_dropout

        # computed as the policy is in this mode: in a training step, the step's arithmetic
        # without dropout (in bf16 PEFT's eval forward rounds the LoRA branch otherwise than
        # the step's fused layers); in evaluation, the eval forward the policy runs too
        same = (
            training_arithmetic_without_dropout(self.model)
            if self.model.training
            else contextlib.nullcontext()
        )
        with torch.no_grad(), same, self.applied():
            sums, _ = sequence_logps(self.model, batch, head_kwarg)
        return sums.float()


def reference_in_step(mode: str, compute_dtype: str, sharded: bool) -> bool:
    """Whether the reference log-probabilities are computed in each step (``True``) or once
    before training, for ``train.reference_logps`` = ``mode``. ``auto``: in each step when the
    model computes in a 16-bit dtype (``compute_dtype``: ``dtype_name``'s ``bf16``/``fp16``),
    where batching moves the rounding; once in fp32, where it moves a sum by ~1e-5 nats and one
    pass is cheaper. Under FSDP (``sharded``) ``auto`` is ``once``: a sharded model cannot set
    the adapter's starting weights back for one forward."""
    if mode == "every_step":
        return True
    if mode == "once":
        return False
    return compute_dtype in ("bf16", "fp16") and not sharded
