"""The loss over packed rows, shared by the training step and evaluation.

``batch["labels"]`` holds shifted targets (``lorakit.packing``); the model computes logits only
where a target exists and the cross-entropy is summed over them. Also: the eval rows each rank
scores, the whole eval split's loss (the trainer's evaluation), and the error a diverged loss
becomes.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

from lorakit.data.tokenize import IGNORE_INDEX

# what the attention function reads of a packed batch (``pair_prompt_lens``: preference pairs
# packed with their prompt once, lorakit.preference.pack_pairs; ``row_prefix_len``: a prefix
# the row's examples share, lorakit.prefix_sharing)
PACKED_KWARGS = (
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
    "pair_prompt_lens",
    "row_prefix_len",
)


def supervised_nll(model: Any, batch: dict[str, Any], head_kwarg: bool = True) -> tuple[Any, int]:
    """Summed next-token NLL over the supervised positions of a packed batch, and their count.

    ``batch["labels"]`` holds shifted targets (see ``lorakit.packing``).
    """
    nll, keep = supervised_token_nll(model, batch, head_kwarg)
    return nll.sum(), int(keep.numel())


def supervised_token_nll(
    model: Any, batch: dict[str, Any], head_kwarg: bool = True
) -> tuple[Any, Any]:
    """One forward of a packed batch: the fp32 next-token NLL at each supervised position, and
    where those positions are in the flattened row (``keep``).

    The model computes its head only where a target exists (``logits_to_keep``); models whose
    forward has no such argument compute all logits and are indexed afterwards. Where the head
    is a plain linear layer (:func:`lorakit.fused_head.plain_head`) it computes the NLL itself,
    a block of the vocabulary at a time, without materializing the logits.
    """
    import torch.nn.functional as F

    from lorakit.fused_head import head_computes_nll, head_matmul_dtype, plain_head

    targets = batch["labels"].reshape(-1)
    keep = (targets != IGNORE_INDEX).nonzero().reshape(-1)
    kept_targets = targets[keep]
    head = plain_head(model) if head_kwarg else None
    if head is None:
        logits, _, _ = supervised_logits(model, batch, head_kwarg, keep)
        return F.cross_entropy(logits.float(), kept_targets, reduction="none"), keep
    with head_computes_nll(head, kept_targets, head_matmul_dtype(model, head)):
        out = _forward(model, batch, keep)
    return out.logits.reshape(-1), keep


def supervised_logits(
    model: Any, batch: dict[str, Any], head_kwarg: bool = True, keep: Any = None
) -> tuple[Any, Any, Any]:
    """One forward of a packed batch: the logits at its supervised positions, their targets,
    and where they are in the flattened row (``keep``)."""
    targets = batch["labels"].reshape(-1)
    if keep is None:
        keep = (targets != IGNORE_INDEX).nonzero().reshape(-1)
    out = _forward(model, batch, keep if head_kwarg else None)
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    if not head_kwarg:
        logits = logits[keep]
    return logits, targets[keep], keep


def _forward(model: Any, batch: dict[str, Any], keep: Any) -> Any:
    extra = {k: batch[k] for k in PACKED_KWARGS if k in batch}
    if keep is not None:
        extra["logits_to_keep"] = keep
    return model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **extra
    )


def eval_batches(total: int, world: int, rank: int, size: int, same_count: bool) -> list[list[int]]:
    """The eval rows rank ``rank`` scores (r, r+N, ...), in batches of ``size``.

    ``same_count``: every rank gets as many batches as the busiest one, the missing ones empty
    (scored on a stand-in row and counted 0). A sharded model (FSDP) gathers its weights from
    all ranks in every forward, so a rank that stopped one batch early would leave the others
    waiting forever.
    """
    mine = list(range(rank, total, world))
    batches = [mine[i : i + size] for i in range(0, len(mine), size)]
    if same_count and world > 1:
        most = math.ceil(math.ceil(total / world) / size)
        batches += [[] for _ in range(most - len(batches))]
    return batches


def accepts_logits_to_keep(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def diverged(step: int, checkpoints: str, what: str = "training loss") -> Exception:
    """The error for a loss (or gradients, or weights) that is NaN/Inf: training stops before
    the optimizer applies it, no adapter is saved from it, and the checkpoints written so far
    stay."""
    from lorakit.errors import RunError
    from lorakit.rundir import COMPLETE

    done = sorted(
        (p for p in Path(checkpoints).glob("checkpoint-*") if (p / COMPLETE).is_file()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    last = f"; the last checkpoint is {done[-1].name}" if done else ""
    return RunError(
        f"the {what} became NaN or Inf at step {step}{last}",
        fix="lower train.learning_rate (or raise warmup_ratio); check the data for broken rows; "
        "a resumed checkpoint may hold damaged weights: resume from an earlier checkpoint-N",
    )


def non_finite(model: Any, grads: bool = False) -> bool:
    """Does a trainable weight hold NaN or Inf, or (``grads``) is the gradient not finite: a
    NaN/Inf entry, or a norm past the float range (clipping would then zero or NaN it)? One
    device sync for all of them."""
    import torch

    tensors = [
        (p.grad if grads else p).detach()
        for p in model.parameters()
        if p.requires_grad and (p.grad is not None or not grads)
    ]
    # a sharded (FSDP) weight is checked on this rank's shard
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors if t.numel()]
    if not tensors:
        return False
    device = tensors[0].device
    if grads:
        norms = torch.stack([torch.linalg.vector_norm(t.float()).to(device) for t in tensors])
        return not bool(torch.linalg.vector_norm(norms).isfinite())
    return not bool(torch.stack([t.isfinite().all().to(device) for t in tensors]).all())


def evaluate_split_loss(trainer: Any, rows: Any, metric_key_prefix: str) -> dict[str, float]:
    """Token-weighted loss over the whole eval split (not a mean of batch means), logged and
    handed to the callbacks like the Trainer's own evaluation.

    Under N processes rank r scores rows r, r+N, ... (no padding rows, so no example is
    counted twice) and the sums are added up over ranks.
    """
    import torch

    batches = eval_batches(
        len(rows),
        trainer.accelerator.num_processes,
        trainer.accelerator.process_index,
        trainer.args.per_device_eval_batch_size,
        same_count=trainer.is_fsdp_enabled,
    )
    model = trainer.model
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=trainer.args.device)
    with torch.no_grad():
        for indices in batches:
            batch = trainer._prepare_inputs(
                trainer.data_collator([rows[i] for i in indices or [0]])
            )
            nll, count = supervised_nll(model, batch, trainer._head_kwarg)
            if indices:
                total[0] += nll.double()
                total[1] += count
    if trainer.accelerator.num_processes > 1:
        total = trainer.accelerator.reduce(total, reduction="sum")
    if was_training:
        model.train()
    metrics = {f"{metric_key_prefix}_loss": float(total[0] / total[1].clamp(min=1))}
    trainer.log(metrics)
    trainer.control = trainer.callback_handler.on_evaluate(
        trainer.args, trainer.state, trainer.control, metrics
    )
    return metrics
