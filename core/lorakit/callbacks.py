"""The Trainer callbacks lorakit adds: metrics to the loggers, complete-checkpoint markers,
an untouched training RNG across evaluations, and one readable line per logged step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.rundir import COMPLETE
from lorakit.tracking import Loggers


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


def step_line() -> Any:
    """One readable line per logged step, for logs and CI (where no progress bar is drawn).

    It replaces transformers' ``PrinterCallback``, which prints each log record as a Python
    dict of strings; the numbers themselves are in metrics.jsonl and the [log] plugins.
    """
    import time

    from transformers import TrainerCallback

    from lorakit.console import say

    class StepLine(TrainerCallback):
        def __init__(self) -> None:
            self.last: tuple[float, int] | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = (time.time(), state.num_input_tokens_seen)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            where = f"step {state.global_step}/{state.max_steps}"
            if "loss" in logs:
                parts = [f"loss {float(logs['loss']):.4f}"]
                if "learning_rate" in logs:
                    parts.append(f"lr {float(logs['learning_rate']):.3g}")
                if logs.get("grad_norm") is not None:
                    parts.append(f"grad_norm {float(logs['grad_norm']):.3g}")
                now, seen = time.time(), state.num_input_tokens_seen
                if self.last is not None and now > self.last[0] and seen > self.last[1]:
                    parts.append(f"{(seen - self.last[1]) / (now - self.last[0]):,.0f} tokens/s")
                self.last = (now, seen)
                say(f"{where}: " + ", ".join(parts))
            elif "eval_loss" in logs:
                say(f"{where}: eval_loss {float(logs['eval_loss']):.4f}")
            elif "train_runtime" in logs:
                runtime = float(logs["train_runtime"])
                say(
                    f"trained to step {state.global_step} in {runtime:.0f} s "
                    f"({state.num_input_tokens_seen:,} tokens)"
                )

    return StepLine()
