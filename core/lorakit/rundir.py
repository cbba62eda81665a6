"""The run folder ``<output.dir>/<name>/`` and everything in it.

Layout::

    recipe.toml          the recipe exactly as given (never rewritten)
    run.json             lorakit version, overrides, start/resume history, config hash
    resolved.json        every setting with defaults filled in
    versions.json        versions of the training stack
    data_report.json     counts per source, skips and drops with reasons, data fingerprint
    data/splits/         train/val/test.jsonl (lorakit prepare, and every run)
    metrics.jsonl        one JSON object per logged step (loss, lr, grad norm, eval loss)
    checkpoints/checkpoint-N/   trainer checkpoints; LORAKIT_COMPLETE is written last
    adapter/             the final adapter + tokenizer (+ chat template)

A run folder that holds ``run.json`` belongs to a run: it is never overwritten. Resume it
with ``--resume-from-checkpoint auto`` or choose another ``output.name``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorakit import __version__
from lorakit.errors import RunError

COMPLETE = "LORAKIT_COMPLETE"
STACK = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "datasets",
    "accelerate",
    "pluggy",
    "attrs",
)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a killed process never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(
        json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8"
    )
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    recipe = property(lambda self: self.path / "recipe.toml")
    run_json = property(lambda self: self.path / "run.json")
    resolved = property(lambda self: self.path / "resolved.json")
    versions = property(lambda self: self.path / "versions.json")
    data_report = property(lambda self: self.path / "data_report.json")
    splits = property(lambda self: self.path / "data" / "splits")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    adapter = property(lambda self: self.path / "adapter")

    def exists(self) -> bool:
        return self.run_json.is_file()

    def start(
        self,
        recipe_text: str,
        resolved: Mapping[str, Any],
        overrides: list[str],
        config_hash: str,
        recipe_path: Path,
    ) -> None:
        """Claim the folder for a new run; refuse if a run already lives there."""
        if self.exists():
            name = self.path.name
            raise RunError(
                f"run folder {self.path} already holds a run",
                fix=f"resume it with --resume-from-checkpoint auto, or start a new one with "
                f"output.name={name}-2 (runs are never overwritten)",
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self.recipe.write_text(recipe_text, encoding="utf-8")
        write_json(self.resolved, resolved)
        write_json(self.versions, stack_versions())
        write_json(
            self.run_json,
            {
                "lorakit_version": __version__,
                "config_hash": config_hash,
                "recipe_path": str(recipe_path),
                "history": [{"event": "start", "time": _now(), "overrides": overrides}],
            },
        )

    def record_resume(self, checkpoint: Path, overrides: list[str]) -> None:
        info = read_json(self.run_json)
        info["history"].append(
            {
                "event": "resume",
                "time": _now(),
                "checkpoint": str(checkpoint),
                "overrides": overrides,
            }
        )
        write_json(self.run_json, info)

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoints with a completeness marker, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for d in self.checkpoints.iterdir():
            m = re.fullmatch(r"checkpoint-(\d+)", d.name)
            if m and (d / COMPLETE).is_file():
                found.append((int(m.group(1)), d))
        return [d for _, d in sorted(found)]

    def resolve_checkpoint(self, spec: str) -> Path:
        """``auto`` -> newest complete checkpoint of this run; else an explicit folder."""
        if spec == "auto":
            if not self.exists():
                raise RunError(
                    f"nothing to resume: {self.path} holds no run",
                    fix="start the run without --resume-from-checkpoint",
                )
            done = self.complete_checkpoints()
            if not done:
                raise RunError(
                    f"{self.checkpoints} holds no complete checkpoint",
                    fix="checkpoints are written every train.save_steps steps; start a new run",
                )
            return done[-1]
        path = Path(spec)
        if not path.is_dir():
            raise RunError(
                f"checkpoint {path} does not exist", fix="pass a checkpoint-N folder or auto"
            )
        if not (path / COMPLETE).is_file() and not (path / "trainer_state.json").is_file():
            raise RunError(
                f"checkpoint {path} is incomplete (no {COMPLETE} marker)",
                fix="the process was probably killed while saving; resume from an earlier checkpoint",
            )
        return path


def stack_versions() -> dict[str, str | None]:
    from lorakit.plugins import installed_version

    out: dict[str, str | None] = {"lorakit": __version__}
    out.update({name: installed_version(name) for name in STACK})
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
