"""KTO's training step: the preference trainer (:mod:`lorakit.preference_training`) over
labelled answers instead of pairs.

What differs from the pair objectives:

- a micro-batch is ``per_device_train_batch_size`` answers packed into one row, with the
  mismatched prompt/answer rows of the KL estimate (:func:`lorakit.kto.pack_answers`);
- before the step's forward, the mismatched rows are scored without gradients by the model
  and by the reference (:class:`lorakit.preference.StepReference`: the adapter switched off
  when it is fresh, else its starting weights set back), and with ``reference_logps =
  "every_step"`` the answers' own row is scored by the reference too;
  their mean log-ratio, averaged over the ranks (in evaluation too, as TRL's gather) and
  clamped at 0, is the step's reference point ``z`` (``kto_loss = "apo_zero_unpaired"``: 0,
  nothing scored);
- the loss is the sum of the per-answer losses divided by the answers of the whole optimizer
  step (TRL averages over a micro-batch's answers: the same for one micro-batch);
- each logged step carries TRL's KTO metric names: ``rewards/chosen`` and ``logps/chosen``
  (the desirable answers), ``rewards/rejected`` and ``logps/rejected`` (the undesirable),
  ``rewards/margins`` (the difference of the two means) and ``kl`` (``z``, the mean over the
  micro-batches), averaged since the last log (``eval_...`` with ``eval_steps``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.kto import (
    AnswerDataset,
    kl_estimate,
    kto_losses,
    mismatched_logps,
    pack_answers,
)
from lorakit.preference import Objective, StepReference, sequence_logps
from lorakit.recipe import Recipe
from lorakit.tracking import Loggers


class AnswerMetrics:
    """Sums of KTO's metrics since the last log (tensors: no device sync per step)."""

    SIZE = 8

    def __init__(self) -> None:
        self.sums: Any = None

    def add(self, rewards: Any, logps: Any, desirable: Any, kl: Any) -> None:
        import torch

        good = desirable.to(rewards.dtype)
        bad = 1 - good
        logps = logps.detach()
        row = torch.stack(
            [
                (rewards * good).sum(),
                good.sum(),
                (rewards * bad).sum(),
                bad.sum(),
                (logps * good).sum(),
                (logps * bad).sum(),
                kl.reshape(()).to(rewards.dtype),
                torch.ones((), dtype=rewards.dtype, device=rewards.device),
            ]
        ).double()
        self.sums = row if self.sums is None else self.sums + row

    def take(self, accelerator: Any, prefix: str = "") -> dict[str, float]:
        """The averages since the last call, over every rank (every rank must call it)."""
        import torch

        sums = self.sums if self.sums is not None else torch.zeros(self.SIZE, dtype=torch.float64)
        self.sums = None
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum")
        s = [float(v) for v in sums]
        if not s[7]:
            return {}
        out = {"kl": s[6] / s[7]}
        if s[1]:
            out["rewards/chosen"] = s[0] / s[1]
            out["logps/chosen"] = s[4] / s[1]
        if s[3]:
            out["rewards/rejected"] = s[2] / s[3]
            out["logps/rejected"] = s[5] / s[3]
        if s[1] and s[3]:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return {f"{prefix}{k}": round(v, 6) for k, v in out.items()}


def make_kto_trainer_class() -> Any:
    from lorakit.preference_training import make_preference_trainer_class

    base: Any = make_preference_trainer_class()

    class KtoTrainer(base):
        """The preference trainer with KTO's loss over labelled answers."""

        _items = "examples"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if getattr(self, "is_fsdp_enabled", False):
                from lorakit.errors import RunError

                raise RunError(
                    "objective = 'kto' does not run under FSDP: its reference log-probabilities "
                    "set the adapter's starting weights back for one forward, which a sharded "
                    "model does not allow",
                    fix="train KTO in one process or under DDP (no FSDP launch config)",
                )
            me: Any = self  # the Trainer's attributes, through an untyped base class
            # the reference of the mismatched rows (and of the answers, in each step)
            self._start = self._step_reference or StepReference(me.model)

        def _new_metrics(self) -> Any:
            return AnswerMetrics()

        def _collective_eval(self) -> bool:
            return self._objective.kto_loss == "kto"  # its KL estimate is averaged over ranks

        def _pair_loss(self, model: Any, inputs: dict[str, Any]) -> tuple[Any, tuple]:
            import torch

            me: Any = self
            if self._objective.kto_loss == "kto":
                plain = me.accelerator.unwrap_model(model)
                policy, reference = mismatched_logps(
                    plain, inputs["kl"], self._head_kwarg, self._start
                )
                z = kl_estimate(policy, reference)
                if me.accelerator.num_processes > 1:  # the mean over the ranks, as TRL's
                    # gather: every rank steps together, and in evaluation every rank scores
                    # as many batches (_collective_eval); a stand-in batch does not count
                    weight = z.new_tensor(0.0 if self._eval_filler else 1.0)
                    both = me.accelerator.reduce(torch.stack([z * weight, weight]), "sum")
                    z = both[0] / both[1].clamp(min=1)
                z = z.clamp(min=0)
            reference = inputs.get("reference")
            if reference is None:  # reference_logps = "every_step": in the step's own row
                reference = self._start.logps(inputs, self._head_kwarg)
            logps, _ = sequence_logps(model, inputs, self._head_kwarg)
            if self._objective.kto_loss != "kto":  # apo_zero_unpaired: no reference point
                z = logps.new_zeros(())
            desirable = inputs["desirable"]
            losses, rewards = kto_losses(self._objective, logps, reference, desirable, z)
            return losses, (rewards, logps, desirable, z)

    return KtoTrainer


def build_kto_trainer(
    recipe: Recipe,
    model: Any,
    train_rows: Sequence[Any],
    eval_rows: Sequence[Any],
    reference: tuple[Sequence[Any], Sequence[Any]] | None,
    output_dir: Path,
    loggers: Loggers,
    device: str,
    compute_dtype: Any,
) -> Any:
    """The trainer for ``objective = "kto"``; ``reference``: the train and eval answers'
    reference log-probabilities computed once, or None: computed in each step."""
    from lorakit.training import finish_trainer

    train_ref, eval_ref = reference if reference is not None else (None, None)
    return finish_trainer(
        make_kto_trainer_class(),
        recipe,
        model,
        AnswerDataset(train_rows, train_ref),
        AnswerDataset(eval_rows, eval_ref) if eval_rows else None,
        pack_answers,
        output_dir,
        loggers,
        device,
        compute_dtype,
        objective=Objective.from_train(recipe.train),
        reference_in_step=reference is None,
    )
