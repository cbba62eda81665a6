"""``jsonl``: ``metrics.jsonl`` in the run folder, one JSON object per logged step.

Always on: ``loss.png``, ``lorakit export`` and ``lorakit compare`` read it. The parameters,
final evaluation and output files already live in the run folder (``resolved.json``,
``versions.json``, ``eval_report.json``), so this logger writes only the per-step records.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from lorakit.api import LogRun, RegisterLogger, RunDir, hookimpl


@attrs.frozen
class JsonlOptions:
    """No options: the file is always ``<run folder>/metrics.jsonl``."""


class JsonlLogger:
    Options = JsonlOptions

    def __init__(self, options: JsonlOptions):
        self.options = options
        self.path: Path | None = None

    def start(self, run: LogRun) -> None:
        self.path = RunDir(run.run_dir).metrics  # created by the first record, not before

    def log_metrics(self, step: int, metrics: Mapping[str, Any], wall_time: float) -> None:
        assert self.path is not None, "start() first"
        record: dict[str, Any] = {"step": step}
        if "epoch" in metrics:
            record["epoch"] = metrics["epoch"]
        record["time"] = round(wall_time, 3)
        record.update((k, v) for k, v in metrics.items() if k != "epoch")
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def log_final(self, step: int, metrics: Mapping[str, float]) -> None:
        """Already in eval_report.json beside metrics.jsonl."""

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        """The files are in the run folder already."""

    def finish(self, status: str) -> None:
        """Nothing is held open between records."""


@hookimpl
def lorakit_register_loggers(register: RegisterLogger) -> None:
    register("jsonl", JsonlLogger)
