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
- nothing else runs per step: no entropy, no accuracy, no extra logits.

Labels come from lorakit's tokenizer (completion-only, built from segment masks), so the tokens
trained on are exactly the ones ``lorakit check`` reports.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.data.tokenize import IGNORE_INDEX, Tokenized
from lorakit.distributed import TIMEOUT_S, gather_to_main, world_size
from lorakit.packing import RowDataset, pack
from lorakit.recipe import Recipe
from lorakit.rundir import COMPLETE
from lorakit.tracking import Loggers

PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


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
        save_total_limit=t.save_total_limit,
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
        include_num_input_tokens_seen="all",  # rows are packed: every input token is real
        report_to="none",
        disable_tqdm=not progress_bars(),  # a bar on a terminal, none in logs
    )


def supervised_nll(model: Any, batch: dict[str, Any], head_kwarg: bool = True) -> tuple[Any, int]:
    """Summed next-token NLL over the supervised positions of a packed batch, and their count.

    ``batch["labels"]`` holds shifted targets (see ``lorakit.packing``). The model computes
    logits only where a target exists (``logits_to_keep``); models whose forward has no such
    argument compute all logits and are indexed afterwards.
    """
    import torch.nn.functional as F

    targets = batch["labels"].reshape(-1)
    keep = (targets != IGNORE_INDEX).nonzero().reshape(-1)
    extra = {k: batch[k] for k in PACKED_KWARGS if k in batch}
    if head_kwarg:
        extra["logits_to_keep"] = keep
    out = model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **extra
    )
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    if not head_kwarg:
        logits = logits[keep]
    nll = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return nll, int(keep.numel())


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


def diverged(step: int, checkpoints: str) -> Exception:
    """The error for a loss that is NaN/Inf: training stops before the optimizer applies it, no
    adapter is saved from it, and the checkpoints written so far stay."""
    from lorakit.errors import RunError

    done = sorted(Path(checkpoints).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    last = f"; the last checkpoint is {done[-1].name}" if done else ""
    return RunError(
        f"the training loss became NaN or Inf at step {step}{last}",
        fix="lower train.learning_rate (or raise warmup_ratio); check the data for broken rows",
    )


def make_trainer_class() -> Any:
    from transformers import Trainer

    class LorakitTrainer(Trainer):
        """Trainer whose step is lorakit's packed, supervised-only, token-weighted loss."""

        # compute_loss divides by the supervised tokens of the whole optimizer step already
        loss_is_scaled_for_ga = True

        def __init__(
            self, *args: Any, token_budget: int = 0, trace: Any = None, **kwargs: Any
        ) -> None:
            super().__init__(*args, **kwargs)
            self._trace = trace  # lorakit.rank_trace.RankTrace when LORAKIT_TRACE_DIR is set
            # labels are shifted by the collator: count them as they are, over every
            # micro-batch of the step (and every rank), for ``num_items_in_batch``
            self._loss_shifts_labels = False
            self.model_accepts_loss_kwargs = True
            self._head_kwarg = accepts_logits_to_keep(self.model)
            self._token_budget = token_budget

        def get_train_dataloader(self) -> Any:
            if not self._token_budget:
                return super().get_train_dataloader()
            from torch.utils.data import DataLoader

            from lorakit.packing import TokenBudgetBatches

            data = self.train_dataset
            lengths = [len(row["input_ids"]) for row in data]  # type: ignore[union-attr]
            batches = TokenBudgetBatches(lengths, self._token_budget, self.args.seed)
            loader = DataLoader(
                data,  # type: ignore[arg-type]
                batch_sampler=batches,
                collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
            )
            return self.accelerator.prepare(loader)

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
            """Token-weighted loss over the whole eval split (not a mean of batch means).

            Under N processes rank r scores rows r, r+N, ... (no padding rows, so no example is
            counted twice) and the sums are added up over ranks.
            """
            import torch

            rows: Any = self.eval_dataset if eval_dataset is None else eval_dataset
            batches = eval_batches(
                len(rows),
                self.accelerator.num_processes,
                self.accelerator.process_index,
                self.args.per_device_eval_batch_size,
                same_count=self.is_fsdp_enabled,
            )
            model: Any = self.model
            was_training = model.training
            model.eval()
            total = torch.zeros(2, dtype=torch.float64, device=self.args.device)
            with torch.no_grad():
                for indices in batches:
                    batch = self._prepare_inputs(
                        self.data_collator([rows[i] for i in indices or [0]])
                    )
                    nll, count = supervised_nll(model, batch, self._head_kwarg)
                    if indices:
                        total[0] += nll.double()
                        total[1] += count
            if self.accelerator.num_processes > 1:
                total = self.accelerator.reduce(total, reduction="sum")
            if was_training:
                model.train()
            metrics = {f"{metric_key_prefix}_loss": float(total[0] / total[1].clamp(min=1))}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(
                self.args, self.state, self.control, metrics
            )
            return metrics

        def _save_rng_state(self, output_dir: str) -> None:
            """Rank 0 writes every rank's RNG state (``rng_state_<rank>.pth``, the names the
            Trainer reads on resume): the other ranks create no file in the run folder, and the
            checkpoint is whole when rank 0 marks it complete."""
            if self.args.world_size <= 1:
                super()._save_rng_state(output_dir)
                return
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

    return LorakitTrainer


def make_callbacks(loggers: Loggers) -> list[Any]:
    from transformers import TrainerCallback

    from lorakit.device import peak_memory_gb

    class MetricsLog(TrainerCallback):
        """Hand every log record to the experiment loggers (metrics.jsonl and the recipe's
        [log] plugins); they write it on threads of their own."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            loggers.log_metrics(
                state.global_step,
                {"epoch": state.epoch, **logs, "peak_memory_gb": round(peak_memory_gb(), 3)},
            )

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

        Building the eval dataloader may draw from torch's global generator, so without this a
        mid-training evaluation could shift the dropout masks of all later steps: adding
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
    train_rows: Sequence[Tokenized],
    eval_rows: Sequence[Tokenized],
    output_dir: Path,
    loggers: Loggers,
    device: str,
    compute_dtype: Any,
) -> Any:
    args = training_args(recipe, output_dir, device, compute_dtype, has_eval=bool(eval_rows))
    if args.n_gpu > 1:
        # Without torchrun the Trainer would wrap the model in nn.DataParallel, which splits a
        # packed row (and its boundaries) across GPUs. One process per GPU is the way to use more.
        args._n_gpu = 1
    from lorakit.rank_trace import RankTrace

    trace = RankTrace.from_env()
    trainer_class = make_trainer_class()
    return trainer_class(
        model=model,
        args=args,
        train_dataset=RowDataset(train_rows),
        eval_dataset=RowDataset(eval_rows) if eval_rows else None,
        data_collator=pack,
        callbacks=[*make_callbacks(loggers), *([trace] if trace else [])],
        trace=trace,
        # packing = true: micro-batches by tokens, as many examples as fit in batch x max_length
        token_budget=recipe.train.per_device_train_batch_size * recipe.train.max_length
        if recipe.train.packing
        else 0,
    )


def adapter_state(trainer: Any) -> dict[str, Any] | None:
    """The whole adapter weights when FSDP shards them (every rank must call this), else None.

    FSDP2 keeps each weight as a sharded ``DTensor``: the LoRA weights are all-gathered. FSDP1
    flattens them, so accelerate gathers the model's state dict (with ``FULL_STATE_DICT``).
    """
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    from lorakit.distributed import gathered_trainable_state

    state = gathered_trainable_state(trainer.model)
    if state is None:
        state = trainer.accelerator.get_state_dict(trainer.model)
    return state


def engine(trainer: Any) -> str:
    """What accelerate actually runs (``FSDP``, ``MULTI_GPU`` = DDP, ``MULTI_CPU``, ``NO``)."""
    kind = trainer.accelerator.distributed_type
    return str(getattr(kind, "value", kind))


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
