"""Build TRL's SFTTrainer for a recipe: config, datasets, callbacks.

We hand SFTTrainer rows that are already tokenized with completion-only ``labels`` and skip its
own preparation, so the labels it trains on are exactly the ones ``lorakit check`` reports.
Padding uses ``-100`` labels, so an end-of-turn token equal to the pad token is still learned.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.data.tokenize import Tokenized
from lorakit.recipe import Recipe
from lorakit.rundir import COMPLETE


def to_dataset(rows: Sequence[Tokenized]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]}
    )


def sft_config(
    recipe: Recipe, output_dir: Path, device: str, compute_dtype: Any, has_eval: bool
) -> Any:
    import torch
    from trl import SFTConfig

    t = recipe.train
    eval_steps = t.eval_steps if (t.eval_steps and has_eval) else None
    return SFTConfig(
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
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        # SFTConfig defaults to bf16 and gradient checkpointing: both wrong on CPU.
        bf16=device == "cuda" and compute_dtype == torch.bfloat16,
        fp16=device == "cuda" and compute_dtype == torch.float16,
        use_cpu=device == "cpu",
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        max_length=t.max_length,
        packing=t.packing,
        packing_strategy="bfd",
        dataset_kwargs={"skip_prepare_dataset": not t.packing},
        dataloader_num_workers=t.dataloader_num_workers,
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=False,
    )


def make_callbacks(metrics_path: Path) -> list[Any]:
    from transformers import TrainerCallback

    class MetricsLog(TrainerCallback):
        """Append every log record to metrics.jsonl (one JSON object per line)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            record = {"step": state.global_step, "epoch": state.epoch, **logs}
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    class CompleteMarker(TrainerCallback):
        """Mark a checkpoint complete only after everything in it is written."""

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                (ckpt / COMPLETE).write_text(f"step {state.global_step}\n")

    class KeepTrainingRng(TrainerCallback):
        """Evaluation leaves the training random stream untouched.

        Building the eval dataloader draws from torch's global generator, so without this every
        mid-training evaluation would shift the dropout masks of all later steps: adding
        ``eval_steps`` would change the trained adapter. The state is taken when the trainer
        decides to evaluate and put back once evaluation is done (checkpoints are saved after).
        """

        def __init__(self) -> None:
            self.saved: tuple[Any, Any] | None = None

        def _take(self, control: Any) -> None:
            import torch

            if control.should_evaluate:
                cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
                self.saved = (torch.get_rng_state(), cuda)

        def on_step_end(self, args, state, control, **kwargs):
            self._take(control)

        def on_epoch_end(self, args, state, control, **kwargs):
            self._take(control)

        def on_evaluate(self, args, state, control, **kwargs):
            import torch

            if self.saved is None:
                return
            cpu, cuda = self.saved
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            self.saved = None

    return [MetricsLog(), CompleteMarker(), KeepTrainingRng()]


def build_trainer(
    recipe: Recipe,
    model: Any,
    tokenizer: Any,
    train_rows: Sequence[Tokenized],
    eval_rows: Sequence[Tokenized],
    output_dir: Path,
    metrics_path: Path,
    device: str,
    compute_dtype: Any,
) -> Any:
    from trl import SFTTrainer

    args = sft_config(recipe, output_dir, device, compute_dtype, has_eval=bool(eval_rows))
    # TRL's own collator pads labels with -100 (by position, not by token id), and with packing
    # it switches to padding-free rows whose position_ids keep examples from attending to each
    # other.
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(train_rows),
        eval_dataset=to_dataset(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        callbacks=make_callbacks(metrics_path),
    )
    keep_adapter_dtype(trainer.model, compute_dtype)
    return trainer


def keep_adapter_dtype(model: Any, compute_dtype: Any) -> None:
    """Undo TRL's cast of trainable weights to bf16 on quantized models when computing in fp32.

    TRL follows the QLoRA paper (bf16 adapters), which on CPU means ~30x slower matmuls and a
    less precise adapter. The optimizer is created later, in ``train()``, so this is safe here.
    """
    import torch

    if compute_dtype != torch.float32:
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
