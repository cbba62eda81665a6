"""The preference training step: lorakit's Trainer with a DPO/SimPO/ORPO loss over packed pairs.

Everything but the loss is the SFT trainer's (:mod:`lorakit.training`): optimizer, schedule,
checkpoints with a completeness marker, exact resume, non-finite guards, the step line. What
changes:

- a micro-batch is ``per_device_train_batch_size`` *pairs*, packed into one padding-free row
  (:func:`lorakit.preference.pack_pairs`);
- the loss is the sum of the per-pair losses divided by the pairs of the whole optimizer step
  (all micro-batches, all ranks), so it does not depend on how pairs are grouped;
- DPO's reference log-probabilities come from the same model (the adapter off, or set back
  to its starting weights): computed in each step from the step's own packed row
  (``reference_logps = "every_step"``, :class:`lorakit.preference.StepReference`: one more
  forward without gradients, the same rounding as the policy's in bf16), or once before
  training (``"once"``, :func:`lorakit.preference.reference_logps`), riding along with each
  pair;
- each logged step carries TRL's metric names: ``rewards/chosen``, ``rewards/rejected``,
  ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, averaged
  over the pairs since the last log (and ``eval_rewards/...`` with ``eval_steps``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.loss import diverged
from lorakit.preference import (
    Objective,
    PairDataset,
    StepReference,
    pack_pairs,
    pair_losses,
    sequence_logps,
    shares_prompt,
)
from lorakit.recipe import Recipe
from lorakit.tracking import Loggers

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


class PairMetrics:
    """Sums of the per-pair metrics since the last log (tensors: no device sync per step)."""

    def __init__(self) -> None:
        self.sums: Any = None

    def add(self, chosen_reward: Any, rejected_reward: Any, logps: Any) -> None:
        import torch

        row = torch.stack(
            [
                chosen_reward.sum(),
                rejected_reward.sum(),
                (chosen_reward > rejected_reward).float().sum(),
                (chosen_reward - rejected_reward).sum(),
                logps[0::2].detach().sum(),
                logps[1::2].detach().sum(),
                torch.tensor(float(chosen_reward.numel()), device=chosen_reward.device),
            ]
        ).double()
        self.sums = row if self.sums is None else self.sums + row

    def take(self, accelerator: Any, prefix: str = "") -> dict[str, float]:
        """The averages since the last call, over every rank (every rank must call it)."""
        import torch

        sums = self.sums if self.sums is not None else torch.zeros(7, dtype=torch.float64)
        self.sums = None
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum")
        n = float(sums[6])
        if not n:
            return {}
        names = (*METRICS, "logps/chosen", "logps/rejected")
        return {f"{prefix}{k}": round(float(sums[i]) / n, 6) for i, k in enumerate(names)}


def make_preference_trainer_class() -> Any:
    from lorakit.training import make_trainer_class

    base: Any = make_trainer_class()

    class PreferenceTrainer(base):
        """The packed SFT trainer with a preference loss over pairs."""

        def __init__(
            self, *args: Any, objective: Objective, reference_in_step: bool = False, **kwargs: Any
        ) -> None:
            super().__init__(*args, **kwargs)
            self._objective = objective
            self._pair_metrics = self._new_metrics()
            me: Any = self  # the Trainer's attributes, through an untyped base class
            # the reference in each step (built now, from the model as the run starts)
            self._step_reference = StepReference(me.model) if reference_in_step else None
            sharded = getattr(self, "is_fsdp_enabled", False)
            if reference_in_step and sharded and objective.name != "kto":  # KTO: its own error
                from lorakit.errors import RunError

                raise RunError(
                    "the reference log-probabilities in each step switch the adapter off or "
                    "set its starting weights back for one forward, which lorakit does not do "
                    "on a sharded (FSDP) model",
                    fix='set train.reference_logps = "once", or train under DDP',
                )

        # what KTO's trainer (lorakit.kto_training) changes: the metrics, the count the loss
        # divides by, the loss, and whether the loss of an eval batch talks to the other ranks
        _items = "pairs"
        _eval_filler = False  # evaluate(): this rank's batch is a stand-in (no rows of its own)

        def _collective_eval(self) -> bool:
            """The loss makes a collective call in evaluation too: every rank must then score
            as many eval batches as the others."""
            return False

        def _new_metrics(self) -> Any:
            return PairMetrics()

        def _get_num_items_in_batch(self, batch_samples: list, device: Any) -> Any:
            """Pairs in the optimizer step (every micro-batch, every rank): the loss divides
            by it."""
            import torch

            count = torch.tensor(sum(int(b[self._items]) for b in batch_samples), device=device)
            if self.accelerator.num_processes > 1:
                count = self.accelerator.reduce(count, reduction="sum")
            return count

        def _pair_loss(self, model: Any, inputs: dict[str, Any]) -> tuple[Any, tuple]:
            """Per-item losses, and what the metrics add."""
            reference = inputs.get("reference")
            if reference is None and self._step_reference is not None:
                # before the policy's forward: a from_adapter reference swaps weights in place
                reference = self._step_reference.logps(inputs, self._head_kwarg)
            logps, counts = sequence_logps(model, inputs, self._head_kwarg)
            losses, chosen, rejected = pair_losses(self._objective, logps, counts, reference)
            return losses, (chosen, rejected, logps)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self._trace is not None:
                self._trace.record(inputs["row_index"].tolist())
            losses, parts = self._pair_loss(model, inputs)
            total = losses.sum()
            if not bool(total.isfinite()):
                raise diverged(self.state.global_step + 1, str(self.args.output_dir))
            self._pair_metrics.add(*parts)
            if num_items_in_batch is None:
                num_items_in_batch = losses.numel()
            loss = total / num_items_in_batch
            if self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages over ranks
            return (loss, None) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:  # a training log: the pair metrics since the last one
                logs = {**logs, **self._pair_metrics.take(self.accelerator)}
            super().log(logs, start_time)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            """The mean pair loss and the reward metrics over the whole eval split."""
            import torch

            from lorakit.loss import eval_batches

            rows: Any = self.eval_dataset if eval_dataset is None else eval_dataset
            batches = eval_batches(
                len(rows),
                self.accelerator.num_processes,
                self.accelerator.process_index,
                self.args.per_device_eval_batch_size,
                same_count=self.is_fsdp_enabled or self._collective_eval(),
            )
            model: Any = self.model
            was_training = model.training
            model.eval()
            total = torch.zeros(2, dtype=torch.float64, device=self.args.device)
            metrics = self._new_metrics()
            with torch.no_grad():
                for indices in batches:
                    batch = self._prepare_inputs(
                        self.data_collator([rows[i] for i in indices or [0]])
                    )
                    self._eval_filler = not indices
                    try:
                        losses, parts = self._pair_loss(model, batch)
                    finally:
                        self._eval_filler = False
                    if indices:
                        total[0] += losses.double().sum()
                        total[1] += losses.numel()
                        metrics.add(*parts)
            if self.accelerator.num_processes > 1:
                total = self.accelerator.reduce(total, reduction="sum")
            if was_training:
                model.train()
            out = {f"{metric_key_prefix}_loss": float(total[0] / total[1].clamp(min=1))}
            out.update(metrics.take(self.accelerator, prefix=f"{metric_key_prefix}_"))
            self.log(out)
            me: Any = self  # the Trainer's attributes, through an untyped base class
            me.control = me.callback_handler.on_evaluate(me.args, me.state, me.control, out)
            return out

    return PreferenceTrainer


def build_preference_trainer(
    recipe: Recipe,
    model: Any,
    train_rows: Sequence[Any],
    eval_rows: Sequence[Any],
    reference: tuple[Sequence[Any], Sequence[Any]] | None,
    output_dir: Path,
    loggers: Loggers,
    device: str,
    compute_dtype: Any,
    share_prefix: bool = False,
    merge_tokens: int = 0,
) -> Any:
    """The trainer for a pair objective; ``reference``: the train and eval pairs' reference
    log-probabilities computed once (DPO), else None (DPO: computed in each step);
    ``share_prefix``: the pairs of a row share their prompts' common prefix
    (:mod:`lorakit.prefix_sharing`); ``merge_tokens``: a step's micro-batches merged up to
    that many tokens (:func:`lorakit.packing.merge_budget`). KTO's is
    :func:`lorakit.kto_training.build_kto_trainer`."""
    from lorakit.training import finish_trainer

    objective = Objective.from_train(recipe.train)
    train_ref, eval_ref = reference if reference is not None else (None, None)
    return finish_trainer(
        make_preference_trainer_class(),
        recipe,
        model,
        PairDataset(train_rows, train_ref),
        PairDataset(eval_rows, eval_ref) if eval_rows else None,
        functools.partial(pack_pairs, share_prompt=shares_prompt(device)),
        output_dir,
        loggers,
        device,
        compute_dtype,
        objective=objective,
        reference_in_step=objective.needs_reference and reference is None,
        share_prefix=share_prefix,
        merge_tokens=merge_tokens,
    )
