"""``tensorboard``: TensorBoard event files in the run folder (``tensorboard --logdir runs``).

Scalars: every logged train/eval metric by optimizer step (``loss``, ``learning_rate``,
``grad_norm``, ``eval_loss``...) and the final evaluation (``final/<base|tuned>/<split>/<metric>``).
Text: the resolved recipe, data fingerprint, package versions, the paths of the run's output
files and ``report.md``. Needs the ``tensorboard`` package (``pip install 'lorakit[track]'``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
from attrs import validators as v
from lorakit.api import LogRun, RegisterLogger, hookimpl, option


def _inside_the_run(_inst, attribute, value):
    parts = Path(value).parts
    if not value or Path(value).is_absolute() or value.startswith("~") or ".." in parts:
        raise ValueError(
            f"{value!r} must be a folder inside the run folder: a relative path without '..' "
            '(e.g. "tensorboard")'
        )


@attrs.frozen
class TensorBoardOptions:
    dir: str = option(
        "tensorboard",
        doc="folder for the event files, inside the run folder (relative, no '..')",
        validator=_inside_the_run,
    )
    flush_secs: int = option(
        10, doc="write pending events to disk at least this often (seconds)", validator=v.ge(1)
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class TensorBoardLogger:
    Options = TensorBoardOptions
    requires: ClassVar[dict[str, str]] = {"tensorboard": "pip install 'lorakit[track]'"}

    def __init__(self, options: TensorBoardOptions):
        self.options = options
        self.writer: Any = None

    def start(self, run: LogRun) -> None:
        from torch.utils.tensorboard import SummaryWriter

        logdir = run.run_dir / self.options.dir
        # a resumed run logs the steps after its checkpoint again: TensorBoard hides the
        # interrupted attempt's events from that step on
        purge = None if run.resumed_from is None else run.resumed_from + 1
        self.writer = SummaryWriter(
            log_dir=str(logdir), flush_secs=self.options.flush_secs, purge_step=purge
        )
        w = self.writer
        w.add_text("recipe", "```json\n" + json.dumps(run.params, indent=2) + "\n```")
        w.add_text("data_fingerprint", f"`{run.data_fingerprint}`")
        w.add_text("config_hash", f"`{run.config_hash}`")
        rows = "\n".join(f"| {k} | {ver or '-'} |" for k, ver in run.versions.items())
        w.add_text("versions", "| package | version |\n| --- | --- |\n" + rows)

    def log_metrics(self, step: int, metrics: Mapping[str, Any], wall_time: float) -> None:
        for key, value in metrics.items():
            number = _number(value)
            if number is not None:
                self.writer.add_scalar(key, number, step, walltime=wall_time)

    def log_final(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        self.writer.add_text("artifacts", "\n".join(f"- `{p}`" for p in paths))
        for p in paths:
            if p.name == "report.md":
                self.writer.add_text("report", p.read_text(encoding="utf-8"))

    def finish(self, status: str) -> None:
        if self.writer is not None:
            self.writer.add_text("status", status)
            self.writer.close()


@hookimpl
def lorakit_register_loggers(register: RegisterLogger) -> None:
    register("tensorboard", TensorBoardLogger)
