"""The training step: transformers' Trainer loop with lorakit's batches and loss.

Why not TRL's SFTTrainer (lorakit used it until 0.1): on real chat data it padded every
micro-batch to its longest row (about half the positions were padding), projected every
position, prompt and padding included, onto the whole vocabulary, and computed entropy and
token accuracy over those full logits at every step. lorakit keeps what the Trainer does well
(optimizer, schedule, gradient accumulation, clipping, checkpoints with optimizer/scheduler/RNG
state, exact resume, DDP/FSDP/DeepSpeed through accelerate, callbacks) and replaces the step:

- a micro-batch is packed into one padding-free row (``lorakit.packing``) and attention stays
  inside each example (``lorakit.attention``): no position is computed for padding;
- the language-model head runs only at supervised positions (``logits_to_keep``), so prompt
  tokens never reach the vocabulary projection, and the cross-entropy is summed over them;
- the loss is the summed token NLL divided by the supervised tokens of the whole optimizer step
  (all micro-batches, all ranks), so it does not depend on how examples were grouped into
  micro-batches or devices;
- on a CPU, the micro-batches of one optimizer step run merged into fewer packed rows (up to
  ``lorakit.packing.MERGE_TOKENS``): the same examples and loss, fewer and fuller passes;
- on a CPU, the prefix every example of a row starts with (a template's system prompt) goes
  through the model once per row (``lorakit.prefix_sharing``);
- nothing else runs per step: no entropy, no accuracy, no extra logits.

Labels come from lorakit's tokenizer (completion-only, built from segment masks), so the tokens
trained on are exactly the ones ``lorakit check`` reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.callbacks import make_callbacks, step_line
from lorakit.data.tokenize import Tokenized
from lorakit.distributed import TIMEOUT_S, gather_to_main, world_size
from lorakit.loss import accepts_logits_to_keep, diverged, evaluate_split_loss, supervised_nll
from lorakit.packing import (
    MERGED,
    RowDataset,
    merge_micro_batches,
    pack,
    token_budget_loader,
)
from lorakit.prefix_sharing import data_tokens, share_row_prefix
from lorakit.recipe import Recipe
from lorakit.tracking import Loggers


def training_args(
    recipe: Recipe, output_dir: Path, device: str, compute_dtype: Any, has_eval: bool
) -> Any:
    import torch
    from transformers import TrainingArguments

    from lorakit.progress import enabled as progress_bars

    t = recipe.train
    eval_steps = t.eval_steps if (t.eval_steps and has_eval) else None
    return TrainingArguments(
        output_dir=str(output_dir),
        seed=t.seed,
        data_seed=t.seed,
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a ratio
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # callbacks.CompleteMarker rotates, after the new marker
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        # The base weights are already in the compute dtype; mixed-precision autocast on top
        # would only add casts. LoRA weights and optimizer state stay fp32 (peft keeps them so).
        bf16=False,
        fp16=device == "cuda" and compute_dtype == torch.float16,
        use_cpu=device == "cpu",
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=t.dataloader_num_workers,
        remove_unused_columns=False,
        average_tokens_across_devices=True,
        # one process per device (torchrun); every LoRA weight takes part in every forward
        ddp_backend=("nccl" if device == "cuda" else "gloo") if world_size() > 1 else None,
        ddp_find_unused_parameters=False,
        ddp_timeout=TIMEOUT_S,
        # NEFTune: noise on the input embeddings while training (0: off)
        neftune_noise_alpha=t.neftune_noise_alpha or None,
        include_num_input_tokens_seen="all",  # rows are packed: every input token is real
        report_to="none",
        disable_tqdm=not progress_bars(),  # a bar on a terminal, none in logs
    )


def make_trainer_class() -> Any:
    import torch
    from transformers import Trainer

    class LorakitTrainer(Trainer):
        """Trainer whose step is lorakit's packed, supervised-only, token-weighted loss."""

        # compute_loss divides by the supervised tokens of the whole optimizer step already
        loss_is_scaled_for_ga = True

        def __init__(
            self,
            *args: Any,
            token_budget: int = 0,
            trace: Any = None,
            merge_tokens: int = 0,
            share_prefix: bool = False,
            **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            self._trace = trace  # lorakit.rank_trace.RankTrace when LORAKIT_TRACE_DIR is set
            # labels are shifted by the collator: count them as they are, over every
            # micro-batch of the step (and every rank), for ``num_items_in_batch``
            self._loss_shifts_labels = False
            self.model_accepts_loss_kwargs = True
            self._head_kwarg = accepts_logits_to_keep(self.model)
            self._token_budget = token_budget
            self._merge_tokens = merge_tokens  # lorakit.packing.merge_budget; 0: off
            # lorakit.prefix_sharing.shares_row_prefix; only where this transformers counts tokens
            # seen through the method overridden below, so that the count stays the examples'
            # tokens (a version without it would count the positions computed)
            self._share_prefix = share_prefix and hasattr(Trainer, "_track_num_input_tokens")
            # this process's training tokens (examples whole) and the positions computed
            self.positions = [0, 0]

        def get_train_dataloader(self) -> Any:
            if not self._token_budget:
                return super().get_train_dataloader()
            return token_budget_loader(self, self._token_budget)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            """The micro-batches of one optimizer step and their supervised tokens, counted
            before any merge; consecutive ones merged (:func:`merge_micro_batches`)."""
            batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)
            if self._merge_tokens and len(batches) > 1:
                batches = merge_micro_batches(batches, self._merge_tokens)
            if self._share_prefix:  # each row's common prefix computed once
                batches = [b if b.get(MERGED) else share_row_prefix(b) for b in batches]
            return batches, items

        def _track_num_input_tokens(self, inputs):
            """Tokens seen: every example whole, a shared prefix counted in each."""
            tokens = data_tokens(inputs)
            self.positions[0] += tokens
            self.positions[1] += int(inputs["input_ids"].numel())
            if self.args.include_num_input_tokens_seen == "no":
                return
            seen = torch.tensor(tokens, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(seen).sum().item()

        def training_step(self, model, inputs, num_items_in_batch=None):
            if inputs.get(MERGED):  # its examples went into a merged micro-batch of this step
                return torch.zeros((), device=self.args.device)
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self._trace is not None:
                self._trace.record(inputs["row_index"].tolist())
            nll, n = supervised_nll(model, inputs, self._head_kwarg)
            if not bool(nll.isfinite()):
                raise diverged(self.state.global_step + 1, str(self.args.output_dir))
            if num_items_in_batch is None:
                num_items_in_batch = n
            # a step whose examples hold no target at all (all supervised tokens at position 0)
            # contributes 0, not NaN
            if isinstance(num_items_in_batch, int):
                denominator: Any = max(num_items_in_batch, 1)
            else:
                denominator = num_items_in_batch.clamp(min=1)
            loss = nll / denominator
            if self.accelerator.num_processes > 1:
                # DDP averages gradients over ranks; the denominator already counts all ranks
                loss = loss * self.accelerator.num_processes
            return (loss, None) if return_outputs else loss

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            """Token-weighted loss over the whole eval split (:func:`evaluate_split_loss`)."""
            rows = self.eval_dataset if eval_dataset is None else eval_dataset
            return evaluate_split_loss(self, rows, metric_key_prefix)

        def _save_rng_state(self, output_dir: str) -> None:
            """Under several ranks rank 0 writes them all (:func:`save_every_ranks_rng_state`)."""
            if self.args.world_size <= 1:
                super()._save_rng_state(output_dir)
                return
            save_every_ranks_rng_state(output_dir)

    return LorakitTrainer


def save_every_ranks_rng_state(output_dir: str) -> None:
    """Rank 0 writes every rank's RNG state (``rng_state_<rank>.pth``, the names the Trainer
    reads on resume): the other ranks create no file in the run folder, and the checkpoint is
    whole when rank 0 marks it complete. Every rank must call this."""
    import os
    import random

    import numpy as np
    import torch

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all()
    states = gather_to_main(state)
    if states is None:
        return
    os.makedirs(output_dir, exist_ok=True)
    for i, s in enumerate(states):
        torch.save(s, os.path.join(output_dir, f"rng_state_{i}.pth"))


def build_trainer(
    recipe: Recipe,
    model: Any,
    train_rows: Sequence[Tokenized],
    eval_rows: Sequence[Tokenized],
    output_dir: Path,
    loggers: Loggers,
    device: str,
    compute_dtype: Any,
    merge_tokens: int = 0,
    share_prefix: bool = False,
) -> Any:
    return finish_trainer(
        make_trainer_class(),
        recipe,
        model,
        RowDataset(train_rows),
        RowDataset(eval_rows) if eval_rows else None,
        pack,
        output_dir,
        loggers,
        device,
        compute_dtype,
        merge_tokens=merge_tokens,
        share_prefix=share_prefix,
    )


def finish_trainer(
    trainer_class: Any,
    recipe: Recipe,
    model: Any,
    train_dataset: Any,
    eval_dataset: Any | None,
    collator: Any,
    output_dir: Path,
    loggers: Loggers,
    device: str,
    compute_dtype: Any,
    **extra: Any,
) -> Any:
    """A trainer of ``trainer_class`` (SFT's, or the preference one) with lorakit's arguments,
    callbacks and batches."""
    args = training_args(
        recipe, output_dir, device, compute_dtype, has_eval=eval_dataset is not None
    )
    if args.n_gpu > 1:
        # Without torchrun the Trainer would wrap the model in nn.DataParallel, which splits a
        # packed row (and its boundaries) across GPUs. One process per GPU is the way to use more.
        args._n_gpu = 1
    from lorakit.rank_trace import RankTrace

    trace = RankTrace.from_env()
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=[
            *make_callbacks(loggers, keep=recipe.train.save_total_limit),
            *([trace] if trace else []),
        ],
        trace=trace,
        # packing = true: micro-batches by tokens, as many examples as fit in batch x max_length
        token_budget=recipe.train.per_device_train_batch_size * recipe.train.max_length
        if recipe.train.packing
        else 0,
        **extra,
    )
    from lorakit.lora_plus import lora_plus_optimizer

    lora_plus = lora_plus_optimizer(trainer, recipe.peft.options)
    if lora_plus is not None:  # LoRA+: B's parameter groups learn faster than A's
        trainer.optimizer_cls_and_kwargs = lora_plus
    if args.disable_tqdm:  # no bar (logs, CI): a readable line instead of a dict per step
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(step_line())
    return trainer


def adapter_state(trainer: Any) -> dict[str, Any] | None:
    """The whole adapter weights when FSDP shards them (every rank must call this), else None."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    from lorakit.distributed import gathered_trainable_state

    return gathered_trainable_state(trainer.model)


def engine(trainer: Any) -> str | None:
    """What accelerate actually runs, for the start line; None in one plain process."""
    kind = trainer.accelerator.distributed_type
    name = str(getattr(kind, "value", kind))
    if name == "NO":
        return None
    label = {"MULTI_GPU": "DDP", "MULTI_CPU": "DDP", "DEEPSPEED": "DeepSpeed"}.get(name, name)
    kind_text = label if label == name else f"{label} ({name} in accelerate)"
    return f"{kind_text}, {trainer.accelerator.num_processes} process(es)"


def planned_steps(trainer: Any) -> int:
    """Optimizer steps the run trains in all: ``max_steps``, or what its epochs come to (the
    Trainer's own arithmetic: micro-batches per epoch / accumulation, rounded up)."""
    import math

    args = trainer.args
    if args.max_steps > 0:
        return int(args.max_steps)
    batches = len(trainer.get_train_dataloader())
    per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)
