"""The Trainer callbacks lorakit adds: metrics to the loggers, complete-checkpoint markers
(and checkpoint rotation after them), non-finite gradients and weights stopped, an untouched
training RNG across evaluations, and one readable line per logged step."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from lorakit.rundir import COMPLETE
from lorakit.tracking import Loggers


def make_callbacks(loggers: Loggers, keep: int | None = None) -> list[Any]:
    """``keep``: how many complete checkpoints to keep (``train.save_total_limit``; None: all).
    The Trainer's own rotation must be off (``save_total_limit=None`` in its arguments): it
    deletes old checkpoints before the new one's marker is written."""
    return [metrics_log(loggers), stop_non_finite(), complete_marker(keep), keep_training_rng()]


def metrics_log(loggers: Loggers) -> Any:
    """Every log record to the experiment loggers, with the peak memory so far."""
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

    return MetricsLog()


def complete_marker(keep: int | None) -> Any:
    """A checkpoint marked complete once written, then the checkpoints past ``keep`` deleted."""
    from transformers import TrainerCallback

    class CompleteMarker(TrainerCallback):
        """Mark a checkpoint complete only after everything in it is written; only then delete
        the checkpoints past ``keep``, so a kill at any moment leaves a complete one."""

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                run_json = Path(args.output_dir).parent / "run.json"
                run_id = (
                    json.loads(run_json.read_text()).get("run_id") if run_json.is_file() else None
                )
                owner = f"run {run_id}\n" if run_id else ""  # resume checks it (rundir.run_id)
                (ckpt / COMPLETE).write_text(f"step {state.global_step}\n{owner}")
                rotate(Path(args.output_dir), state.global_step, keep)

    return CompleteMarker()


def stop_non_finite() -> Any:
    """Non-finite gradients or weights stop the run before they are applied or saved."""
    from transformers import TrainerCallback

    from lorakit.loss import diverged, non_finite

    class StopNonFinite(TrainerCallback):
        """NaN/Inf gradients stop the run before the optimizer applies them, and NaN/Inf
        weights stop it before a checkpoint is written: no checkpoint or adapter holds them.

        The loss can stay finite while the gradients overflow (damaged weights resumed), and
        clipping then hides it (an infinite norm scales every gradient to 0, an Inf entry to
        NaN), so each gradient's norm is taken as it is accumulated, before clipping (one
        kernel per weight); they are combined and synced once, before the optimizer step.
        """

        def __init__(self) -> None:
            self.handles: list[Any] = []
            self.norms: list[Any] = []

        def _seen(self, param: Any) -> None:
            import torch

            grad = param.grad.detach()
            grad = grad.to_local() if hasattr(grad, "to_local") else grad
            self.norms.append(torch.linalg.vector_norm(grad, dtype=torch.float32))

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            for p in model.parameters() if model is not None else ():
                if p.requires_grad:
                    self.handles.append(p.register_post_accumulate_grad_hook(self._seen))

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            import torch

            norms, self.norms = self.norms, []
            bad = False
            if norms:  # their combined norm overflows too when the total does
                total = torch.linalg.vector_norm(torch.stack([n.to(norms[0]) for n in norms]))
                bad = not bool(torch.isfinite(total))
            # after clipping, for weights whose hook a sharding engine bypassed
            bad = bad or (model is not None and non_finite(model, grads=True))
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                # every rank stops together (one rank's local gradients may be the bad ones)
                flag = torch.tensor(float(bad), device=next(model.parameters()).device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                bad = bool(flag)
            if bad:
                raise diverged(state.global_step + 1, args.output_dir, what="gradients")

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if control.should_save and model is not None and non_finite(model):
                raise diverged(state.global_step, args.output_dir, what="adapter weights")

        def on_train_end(self, args, state, control, **kwargs):
            while self.handles:
                self.handles.pop().remove()

    return StopNonFinite()


def keep_training_rng() -> Any:
    """Evaluations leave the training random stream as they found it."""
    from transformers import TrainerCallback

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

    return KeepTrainingRng()


def rotate(folder: Path, newest: int, keep: int | None) -> None:
    """After ``checkpoint-<newest>`` is marked complete: delete unfinished checkpoints older
    than it (saves a kill interrupted) and complete ones beyond the newest ``keep``, by step."""
    found = []
    for d in folder.iterdir() if folder.is_dir() else ():
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and int(m.group(1)) <= newest:
            found.append((int(m.group(1)), d))
    complete = [d for _, d in sorted(found) if (d / COMPLETE).is_file()]
    doomed = [d for _, d in found if not (d / COMPLETE).is_file()]
    if keep is not None and keep > 0:
        doomed += complete[:-keep]
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)


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
                if "rewards/accuracies" in logs:  # a preference objective
                    parts.append(f"reward acc {float(logs['rewards/accuracies']):.2f}")
                    parts.append(f"margin {float(logs['rewards/margins']):.3g}")
                elif "kl" in logs:  # KTO: its reference point
                    parts.append(f"kl {float(logs['kl']):.3g}")
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
