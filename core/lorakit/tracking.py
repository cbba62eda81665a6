"""Experiment loggers (``[log] plugins``): the fan-out the run talks to (:mod:`lorakit.recipe`
validates ``[log]``).

The core writes ``metrics.jsonl`` in the run folder itself, one JSON object per logged step:
``loss.png``, ``lorakit export`` and ``lorakit compare`` read it, so no plugin owns it. The
recipe's ``[log] plugins`` (e.g. ``["tensorboard", "mlflow"]``) mirror the same records to
trackers. Every logger runs on a thread of its own and is fed through a queue, so training never
waits on a tracker. A logger that raises (server down, disk full, bad URI) is reported once and
called no more; the run goes on. Only rank 0 logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.contracts import LogRun
from lorakit.evaluation.numbers import nan_for_null
from lorakit.rundir import RunDir, flatten_keys, json_text, read_json, stack_versions

if TYPE_CHECKING:
    from lorakit.recipe import Recipe

CLOSE_TIMEOUT_S = 120.0  # the most a run waits at its end for a logger to finish


def flatten(node: Any) -> dict[str, str]:
    """A nested recipe as ``{"train.learning_rate": "0.0002", ...}`` (lists as JSON)."""
    return {
        key: value if isinstance(value, str) else json.dumps(value, default=str)
        for key, value in flatten_keys(node).items()
    }


def final_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """``eval_report.json`` as ``{"final/<base|tuned>/<split>/<metric>": value}``."""
    out: dict[str, float] = {}
    for result in report.get("results", []):
        label = "base" if result.get("adapter") is None else "tuned"
        for name, value in nan_for_null(result.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"final/{label}/{result['split']}/{name}"] = float(value)
    return out


class _Worker:
    """One logger on its own thread; the first exception turns it off with one warning."""

    def __init__(self, name: str, logger: Any, warn: Callable[[str], None]) -> None:
        self.name = name
        self.logger = logger
        self.warn = warn
        self.failed = False
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=f"lorakit-log-{name}", daemon=True)
        self.thread.start()

    def submit(self, method: str, *args: Any) -> None:
        if not self.failed:
            self.queue.put((method, args))

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            method, args = item
            if method == "_barrier":
                args[0].set()
                continue
            if self.failed:
                continue
            try:
                getattr(self.logger, method)(*args)
            except Exception as exc:  # a tracker's failure must never stop the run
                self.failed = True
                reason = (str(exc).splitlines() or ["no message"])[0]
                if len(reason) > 160:
                    reason = reason[:157] + "..."
                self.warn(
                    f"logger {self.name} failed in {method} ({type(exc).__name__}: {reason}); "
                    "it is off for the rest of this run, training goes on"
                )

    def wait(self, timeout: float) -> bool:
        """Block until everything submitted so far is handled (or ``timeout``)."""
        done = threading.Event()
        self.queue.put(("_barrier", (done,)))
        return done.wait(timeout)

    def stop(self, timeout: float) -> bool:
        self.queue.put(None)
        self.thread.join(timeout)
        return not self.thread.is_alive()


# Watchers of the training log on the training thread itself (``lorakit sweep``'s pruner):
# each is called with every logged step as it is logged, and may raise to stop the run there.
_WATCHERS: list[Callable[[int, Mapping[str, Any]], None]] = []


@contextlib.contextmanager
def watching(watcher: Callable[[int, Mapping[str, Any]], None]) -> Iterator[None]:
    """Call ``watcher(step, metrics)`` on every logged step of the runs started inside the
    block, synchronously (an exception it raises stops training with it)."""
    _WATCHERS.append(watcher)
    try:
        yield
    finally:
        _WATCHERS.remove(watcher)


class Loggers:
    """What the run and the training callback call; each call is queued to every logger.

    Empty (every call a no-op) until :meth:`open`; ranks other than 0 never open it.
    """

    def __init__(self, say: Callable[[str], None]) -> None:
        self.workers: list[_Worker] = []
        self.say = say
        self.closed = False
        self.metrics_file: Path | None = None  # the run's metrics.jsonl, once open
        # a resumed run: (the checkpoint's step, the summed loss of the steps up to it, None
        # where the log cannot tell), so the summary's train_loss covers every step
        self.resumed: tuple[int, float | None] | None = None

    def open(self, loggers: Mapping[str, Any], run: LogRun) -> None:
        self.metrics_file = RunDir(run.run_dir).metrics  # created by the first record
        self.workers = [_Worker(n, lg, self.say) for n, lg in loggers.items()]
        self.start(run)

    @property
    def names(self) -> list[str]:
        return [w.name for w in self.workers]

    def _all(self, method: str, *args: Any) -> None:
        for w in self.workers:
            w.submit(method, *args)

    def start(self, run: LogRun) -> None:
        self._all("start", run)

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One logged step: appended to metrics.jsonl here and now (complete whenever the run
        reads it), then queued to every logger."""
        wall_time = time.time()
        if "train_loss" in metrics and self.resumed is not None:
            metrics = self._whole_run_loss(step, metrics)
        if self.metrics_file is not None:
            # a diverged loss or grad norm (NaN, inf) as null: every line stays JSON
            line = json_text(metrics_record(step, metrics, wall_time)) + "\n"
            try:
                # never appended through a link planted in the run folder (O_NOFOLLOW)
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                fd = os.open(self.metrics_file, flags, 0o644)
                with os.fdopen(fd, "a", encoding="utf-8") as f:
                    f.write(line)
            except OSError as exc:
                self.say(
                    f"cannot write {self.metrics_file} ({exc.strerror or exc}): loss.png and "
                    "compare will lack the steps from here; training goes on"
                )
                self.metrics_file = None
        self._all("log_metrics", step, dict(metrics), wall_time)
        for watcher in list(_WATCHERS):
            watcher(step, metrics)

    def _whole_run_loss(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """The Trainer's summary after a resume: its ``train_loss`` is the mean over the steps
        this session trained; made the mean over all of the run's steps, or left out (and
        said) where the earlier steps' losses are not all in the log."""
        assert self.resumed is not None
        done, earlier = self.resumed
        out = dict(metrics)
        if earlier is None or step <= done:
            del out["train_loss"]
            self.say(
                "note: train_loss left out of the summary: the steps before the resumed "
                "checkpoint are not all in metrics.jsonl (logging_steps does not divide its "
                "step), so no mean over the whole run can be given"
            )
        else:
            out["train_loss"] = (float(metrics["train_loss"]) * (step - done) + earlier) / step
        return out

    def log_final(self, step: int, metrics: Mapping[str, float]) -> None:
        if metrics:
            self._all("log_final", step, dict(metrics))

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        present = [p for p in paths if p.exists()]
        if present:
            self._all("log_artifacts", present)

    def flush(self, name: str, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Wait until logger ``name`` has handled what was sent (the others are not waited
        for)."""
        for w in self.workers:
            if w.name == name:
                w.wait(timeout)

    def close(self, status: str = "FINISHED", timeout: float = CLOSE_TIMEOUT_S) -> None:
        if self.closed:
            return
        self.closed = True
        self._all("finish", status)
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if not w.stop(max(deadline - time.monotonic(), 0.0)):
                self.say(
                    f"logger {w.name} did not finish within {timeout:.0f}s; its record may be incomplete"
                )


def metrics_record(step: int, metrics: Mapping[str, Any], wall_time: float) -> dict[str, Any]:
    """One line of metrics.jsonl: step, epoch, time, then the Trainer's values."""
    record: dict[str, Any] = {"step": step}
    if "epoch" in metrics:
        record["epoch"] = metrics["epoch"]
    record["time"] = round(wall_time, 3)
    record.update((k, v) for k, v in metrics.items() if k != "epoch")
    return record


def run_info(
    recipe: Recipe,
    run: RunDir,
    data_fingerprint: str,
    resumed: bool,
    resumed_from: int | None = None,
) -> LogRun:
    versions = read_json(run.versions) if run.versions.is_file() else stack_versions()
    return LogRun(
        name=recipe.name,
        run_dir=run.path,
        output_dir=recipe.output_dir,
        params=recipe.resolved(),
        data_fingerprint=data_fingerprint,
        versions=versions,
        config_hash=recipe.config_hash(),
        resumed=resumed,
        resumed_from=resumed_from,
    )


def log_outputs(loggers: Loggers, run: RunDir, report: Path | None, step: int) -> None:
    """After evaluation: the final metrics (base and tuned) and the run's files."""
    if report is not None:
        loggers.log_final(step, final_metrics(read_json(report)))
    files = ("eval_report.json", "report.md", "loss.png", "predictions.jsonl")
    loggers.log_artifacts(
        [run.adapter, *(run.path / f for f in files), run.data_report, run.resolved]
    )
