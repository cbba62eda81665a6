"""Faults injected into real ``lorakit run`` processes: a disk that fills up (RLIMIT_FSIZE: a
write past the limit fails with EFBIG, as ENOSPC would) and SIGKILL at chosen moments."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_recipe

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def lorakit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorakit.cli.main", *args]


def file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize(
    ("limit", "steps", "what", "kept"),
    [
        (5_000, 1, "the data splits", "no split file was left half-written"),
        (50_000, 1, "a checkpoint", "no checkpoint was completed"),
        (20_000, 1, "the adapter", "no adapter folder was written; the newest complete"),
    ],
    ids=["splits", "checkpoint", "adapter"],
)
def test_a_full_disk_is_a_clear_error_and_nothing_half_written_looks_complete(
    tmp_path, tiny_model_dir, chat_file, limit, steps, what, kept
):
    """Files in a tiny run: train.jsonl 9 kB, the adapter 36 kB, optimizer.pt 89 kB. The limit
    lets everything before the named write through and fails that one."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "full"')
    args = ["run", str(recipe), f"train.max_steps={steps}", "train.save_steps=1"]
    run = tmp_path / "runs" / "full"
    if what == "the adapter":
        # the run trained and checkpointed; it was stopped while saving the adapter; the
        # resume only saves the adapter, and the disk fills up then
        first = subprocess.run(lorakit(*args), env=ENV, capture_output=True, text=True)
        assert first.returncode == 0, first.stderr
        import shutil

        shutil.rmtree(run / "adapter")
        args += ["--resume-from-checkpoint", "auto"]
    done = subprocess.run(
        lorakit(*args),
        env=ENV,
        capture_output=True,
        text=True,
        preexec_fn=file_size_limit(limit),
        timeout=300,
    )
    err = done.stderr
    assert done.returncode == 2, err
    assert "Traceback" not in err
    assert "the disk is full" in err and f"while writing {what}" in err and kept in err, err
    assert not list(run.rglob("*.tmp")) and not list(run.glob(".adapter.tmp-*")), "temp files left"
    assert not (run / "adapter").exists()
    marked = sorted(p.parent.name for p in run.rglob("LORAKIT_COMPLETE"))
    assert marked == (["checkpoint-1"] if what == "the adapter" else []), marked
    if what == "the data splits":
        assert not (run / "data" / "splits" / "train.jsonl").exists()
