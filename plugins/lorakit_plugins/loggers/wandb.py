"""``wandb``: a Weights & Biases run per lorakit run; offline by default (no network, no
account), synced later with ``wandb sync``.

Logged: the resolved recipe as the run's config (``train.learning_rate``...) with
``data_fingerprint``, ``config_hash`` and ``versions``; every train/eval metric by optimizer
step; the final evaluation (``final/<base|tuned>/<split>/<metric>``) in the history and the
summary; the reports (and, with ``log_adapter``, the adapter) as an artifact of type
``lorakit-run``. The W&B run folder is ``<run>/wandb/`` (``offline-run-*/run-<id>.wandb``).
A resumed lorakit run continues its W&B run (the id is kept in ``<run>/wandb/lorakit-run-id``).
Needs the ``wandb`` package (``pip install 'lorakit[track]'``).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import attrs
from attrs import validators as v
from lorakit.api import LogRun, RegisterLogger, hookimpl, option

EXIT_CODES = {"FINISHED": 0, "FAILED": 1, "KILLED": 130}


@attrs.frozen
class WandbOptions:
    mode: Literal["", "offline", "online", "disabled"] = option(
        "",
        doc='"offline" (written to the run folder; `wandb sync` uploads it), "online" (needs '
        'WANDB_API_KEY), "disabled"; empty: WANDB_MODE, else offline',
    )
    project: str = option("lorakit", doc="W&B project the runs are filed under")
    entity: str = option("", doc="W&B team or user (empty: the account's default)")
    tags: list[str] = option(attrs.Factory(list), doc="tags on every run")
    log_adapter: bool = option(
        False, doc="put the adapter folder in the run's artifact too (MBs to hundreds of MBs)"
    )
    init_timeout_s: int = option(
        60,
        doc="seconds to wait for W&B to start (its service process, or the server)",
        validator=v.ge(1),
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class WandbLogger:
    Options = WandbOptions
    requires: ClassVar[dict[str, str]] = {"wandb": "pip install 'lorakit[track]'"}

    def __init__(self, options: WandbOptions):
        self.options = options
        self.run: Any = None
        self.name = "run"

    def start(self, run: LogRun) -> None:
        import wandb

        mode: Any = self.options.mode or os.environ.get("WANDB_MODE") or "offline"
        folder = run.run_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "lorakit-run-id"
        run_id = id_file.read_text().strip() if run.resumed and id_file.is_file() else ""
        if not run_id:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
        config = dict(run.params)
        config.update(
            data_fingerprint=run.data_fingerprint,
            config_hash=run.config_hash,
            versions=dict(run.versions),
        )
        self.name = re.sub(r"[^A-Za-z0-9._-]+", "-", run.name) or "run"
        self.run = wandb.init(
            project=self.options.project,
            entity=self.options.entity or None,
            name=run.name,
            id=run_id,
            resume="allow" if run.resumed else None,
            dir=str(run.run_dir),
            config=config,
            tags=list(self.options.tags) or None,
            settings=wandb.Settings(
                mode=mode,
                init_timeout=float(self.options.init_timeout_s),
                console="off",
                silent=True,
                x_disable_stats=True,
                x_disable_meta=True,
            ),
        )

    def log_metrics(self, step: int, metrics: Mapping[str, Any], wall_time: float) -> None:
        numbers = {k: n for k, x in metrics.items() if (n := _number(x)) is not None}
        if numbers:
            self.run.log(numbers, step=step)

    def log_final(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)
        self.run.summary.update(dict(metrics))

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        import wandb

        artifact = wandb.Artifact(f"{self.name}-outputs", type="lorakit-run")
        added = 0
        for p in paths:
            if p.is_dir():
                if p.name == "adapter" and not self.options.log_adapter:
                    continue
                artifact.add_dir(str(p), name=p.name)
                added += 1
            elif p.is_file():
                artifact.add_file(str(p), name=p.name)
                added += 1
        if added:
            self.run.log_artifact(artifact)

    def finish(self, status: str) -> None:
        if self.run is not None:
            self.run.summary["lorakit/status"] = status
            self.run.finish(exit_code=EXIT_CODES.get(status, 1))


@hookimpl
def lorakit_register_loggers(register: RegisterLogger) -> None:
    register("wandb", WandbLogger)
