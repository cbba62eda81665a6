"""LoRA+ (Hayou et al. 2024): the optimizer of ``[train].optim`` with B's weights in parameter
groups of their own, at ``[peft].lora_plus_ratio`` times the learning rate.

The Trainer builds the optimizer (``create_optimizer``, after accelerate has wrapped the model)
from ``optimizer_cls_and_kwargs``; a factory there receives the model and splits its trainable
weights by (lora_B or not, weight decay or not). The schedule scales every group's own learning
rate, and the groups are saved and restored with the optimizer's state on resume.
"""

from __future__ import annotations

from typing import Any

from lorakit.contracts import LoraInitOptions
from lorakit.errors import RunError

B_NAMES = (".lora_B.", ".lora_embedding_B.")


def is_lora_b(name: str) -> bool:
    return any(part in name for part in B_NAMES)


def lora_plus_optimizer(trainer: Any, peft_options: Any) -> tuple[Any, dict[str, Any]] | None:
    """``(factory, kwargs)`` for ``Trainer.optimizer_cls_and_kwargs``: ``[train].optim``'s
    optimizer over four groups, B's at ``lora_plus_ratio`` times the learning rate; None when
    the [peft] options ask for no LoRA+."""
    from transformers.trainer_optimizer import is_optimizer_factory

    if not isinstance(peft_options, LoraInitOptions) or not peft_options.lora_plus_ratio:
        return None
    ratio = float(peft_options.lora_plus_ratio)

    args = trainer.args
    cls, kwargs = trainer.get_optimizer_cls_and_kwargs(args, trainer.model)
    if is_optimizer_factory(cls) or {"params", "model", "optimizer_dict"} & set(kwargs):
        raise RunError(
            f"[peft].lora_plus_ratio needs an optimizer over parameter groups, and "
            f"[train].optim = {args.optim!r} builds its own",
            where="[peft].lora_plus_ratio",
            fix='use optim = "adamw_torch" (or another AdamW) with lora_plus_ratio, or set '
            "lora_plus_ratio = 0",
        )
    lr, decay = args.learning_rate, args.weight_decay

    def build(model: Any, **options: Any) -> Any:
        decayed = set(trainer.get_decay_parameter_names(model))
        groups: dict[tuple[bool, bool], list[Any]] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                groups.setdefault((is_lora_b(name), name in decayed), []).append(param)
        param_groups = [
            {"params": params, "weight_decay": decay if d else 0.0, "lr": lr * (ratio if b else 1)}
            for (b, d), params in sorted(groups.items())  # A's groups first: the logged lr
        ]
        return cls(param_groups, **options)

    return (lambda: build), kwargs
