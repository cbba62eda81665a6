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
from helpers import tiny_recipe

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
        # the data is spooled under $TMPDIR as it is read, before the run folder is claimed
        (5_000, 1, "the temporary split files", "nothing was written to the run folder"),
        (50_000, 1, "a checkpoint", "no checkpoint was completed"),
        (20_000, 1, "the adapter", "no adapter folder was written; the newest complete"),
    ],
    ids=["spool", "checkpoint", "adapter"],
)
def test_a_full_disk_is_a_clear_error_and_nothing_half_written_looks_complete(
    tmp_path, tiny_model_dir, chat_file, cli, limit, steps, what, kept
):
    """Files in a tiny run: train.jsonl 9 kB, the adapter 36 kB, optimizer.pt 89 kB. The limit
    lets everything before the named write through and fails that one."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "full"')
    args = ["run", str(recipe), f"train.max_steps={steps}", "train.save_steps=1"]
    run = tmp_path / "runs" / "full"
    if what == "the adapter":
        # the run trained and checkpointed; it was stopped while saving the adapter; the
        # resume only saves the adapter, and the disk fills up then
        code, _, err = cli(*args)
        assert code == 0, err
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
    if what == "the temporary split files":
        assert not (run / "data" / "splits" / "train.jsonl").exists()


WRITE_SPLITS_FULL = """
import resource, signal, sys
from pathlib import Path
from lorakit.contracts import Example, Message
from lorakit.data.pipeline import Splits, write_splits
from lorakit.errors import RunError
rows = [Example(id=f"e{i}", messages=(Message("user", "q" * 200), Message("assistant", "a")))
        for i in range(40)]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))
try:
    write_splits(Path(sys.argv[1]), Splits(train=rows, val=rows[:2], test=[]))
except RunError as exc:
    print(exc)
"""


def test_split_files_onto_a_full_disk_are_a_clear_error_and_none_is_half_written(tmp_path):
    """The run folder's disk fills up while the splits are written (the data was spooled on
    another disk, under TMPDIR): one clear error, and no split file half-written."""
    folder = tmp_path / "splits"
    done = subprocess.run(
        [sys.executable, "-c", WRITE_SPLITS_FULL, str(folder)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "the disk is full" in done.stdout and "while writing the data splits" in done.stdout
    assert "no split file was left half-written" in done.stdout, done.stdout + done.stderr
    assert not (folder / "train.jsonl").exists() and not list(folder.glob(".*.tmp"))


def test_a_gguf_export_onto_a_full_disk_is_a_clear_error_and_leaves_no_file(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """The GGUF writer's short write is an OSError with no errno ("N requested and M
    written"), which the disk-full handler missed: a traceback, exit 1. The tiny model's f16
    GGUF is about 250 kB; the adapter export's files are under 100 kB, so the limit fails the
    GGUF alone."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "gguf"')
    code, _, err = cli("run", str(recipe), "train.max_steps=1", 'eval.metrics=["eval_loss"]')
    assert code == 0, err
    run = tmp_path / "runs" / "gguf"
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    done = subprocess.run(
        lorakit("export", str(run), "--gguf"),
        env=ENV,
        capture_output=True,
        text=True,
        preexec_fn=file_size_limit(100_000),
        timeout=300,
    )
    err = done.stderr
    assert done.returncode == 2, err
    assert "Traceback" not in err
    assert "the disk is full" in err and "the GGUF export" in err, err
    assert "nothing was exported" in err and "--out" in err, err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before, "files left behind"


def kill_when(cmd: list[str], ready, what: str) -> str:
    """Start ``cmd``, SIGKILL it the moment ``ready()`` is true; returns what was seen then."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None:
            seen = ready()
            if seen:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return seen
            time.sleep(0.001)
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise AssertionError(f"the run ended before {what} (exit {proc.returncode}):\n{err}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigkill_while_checkpointing_and_while_saving_resumes_to_the_same_adapter(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """Kill a real run while it writes checkpoint-3 (or right after it), resume it and kill the
    resume while it writes the final adapter, resume again: the adapter is bit-identical to an
    uninterrupted run's."""
    from safetensors.torch import load_file

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file)
    common = ["train.max_steps=4", "train.save_steps=1", 'eval.metrics=["eval_loss"]']
    assert cli("run", str(recipe), "output.name=ref", *common)[0] == 0
    run = tmp_path / "runs" / "killed"
    args = ["run", str(recipe), "output.name=killed", *common]

    def checkpoint_3() -> str:
        ckpt = run / "checkpoints" / "checkpoint-3"
        if not ckpt.is_dir():
            return ""
        return "complete" if (ckpt / "LORAKIT_COMPLETE").exists() else "being written"

    moment = kill_when(lorakit(*args), checkpoint_3, "checkpoint-3")
    resume = [*args, "--resume-from-checkpoint", "auto"]

    def adapter_being_written() -> str:
        return "adapter being written" if list(run.glob(".adapter.tmp-*")) else ""

    kill_when(lorakit(*resume), adapter_being_written, "the adapter save")
    assert not (run / "adapter").exists(), "a killed save must not leave an adapter folder"
    code, _, err = cli(*resume)
    assert code == 0, err
    assert "not training" in err, "the last step was done: the resume only saves the adapter"
    assert not list(run.glob(".adapter.tmp-*")), "the killed save's half-written folder stays"
    ref = load_file(str(tmp_path / "runs" / "ref" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert ref.keys() == got.keys()
    assert all(ref[k].equal(got[k]) for k in ref), f"adapter differs (killed: {moment})"


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_pickle_that_names_code_is_refused_before_loading(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """rng_state.pth replaced by a pickle that would run ``os.system``: an explicit resume is
    refused naming the file (and never suggests loading it unsafely), ``auto`` skips it."""
    import torch

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "evil"')
    common = (
        "train.save_steps=1",
        'eval.metrics=["eval_loss"]',
        'train.lr_scheduler_type="constant"',  # resumed to a new max_steps
    )
    assert cli("run", str(recipe), "train.max_steps=2", *common)[0] == 0
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "runs" / "evil" / "checkpoints" / "checkpoint-2"
    torch.save({"python": _RunsCode(str(marker))}, str(ckpt / "rng_state.pth"))
    code, _, err = cli(
        "run", str(recipe), "train.max_steps=3", *common, "--resume-from-checkpoint", str(ckpt)
    )
    assert code == 2 and "rng_state.pth" in err and "runs code when loaded" in err, err
    assert "weights_only" not in err and "Traceback" not in err
    code, _, err = cli(
        "run", str(recipe), "train.max_steps=3", *common, "--resume-from-checkpoint", "auto"
    )
    assert code == 0, err
    assert "skipping checkpoint-2: rng_state.pth" in err and "from checkpoint-1" in err
    assert not marker.exists(), "the pickle's code ran"


def test_a_run_killed_while_writing_its_first_checkpoint_starts_again(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """SIGKILL while checkpoint-1 is written (no marker yet): the folder holds no complete
    checkpoint, so `lorakit run` starts it again instead of sending the user to a resume that
    has nothing to resume."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "cut"')
    args = ["run", str(recipe), "train.max_steps=2", "train.save_steps=1"]
    ckpt = tmp_path / "runs" / "cut" / "checkpoints" / "checkpoint-1"

    def being_written() -> str:
        if ckpt.is_dir() and not (ckpt / "LORAKIT_COMPLETE").exists():
            return "being written"
        return ""

    kill_when(lorakit(*args), being_written, "checkpoint-1 is written")
    code, _, err = cli(*args, "--resume-from-checkpoint", "auto")  # nothing to resume: says so
    assert code == 2 and "run it again without --resume-from-checkpoint" in err, err
    code, _, err = cli(*args)
    assert code == 0 and "started again" in err, err
    assert (ckpt.parent / "checkpoint-2" / "LORAKIT_COMPLETE").is_file()


def test_rotation_never_deletes_the_last_complete_checkpoint(
    tmp_path, tiny_model_dir, chat_file, cli, monkeypatch
):
    """With save_total_limit = 1, every deletion of a checkpoint happens while a newer complete
    one exists: a kill between rotation and the new marker cannot leave none."""
    import shutil

    ckpts = tmp_path / "runs" / "rot" / "checkpoints"
    unsafe: list[str] = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.parent == ckpts and (path / "LORAKIT_COMPLETE").is_file():
            step = int(path.name.split("-")[1])
            newer = [
                p.name
                for p in ckpts.glob("checkpoint-*")
                if int(p.name.split("-")[1]) > step and (p / "LORAKIT_COMPLETE").is_file()
            ]
            if not newer:
                unsafe.append(path.name)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "rot"')
    code, _, err = cli(
        "run", recipe, "train.max_steps=3", "train.save_steps=1", "train.save_total_limit=1"
    )
    assert code == 0, err
    assert unsafe == [], f"deleted while no newer checkpoint was complete: {unsafe}"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-3"]


def _damage(checkpoint: Path, name: str, value: float) -> None:
    """Overwrite one adapter tensor of a checkpoint with garbage (a bit flip, a bad disk)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = checkpoint / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if name in k)
    noise = torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(0))
    tensors[key] = noise * value
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_resuming_garbage_weights_stops_on_non_finite_gradients(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """A checkpoint whose q_proj lora_B holds huge finite values: the loss stays finite, the
    gradients do not. The resume stops at that step (exit 2) and saves no adapter."""
    import shutil

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "junk"')
    args = ["run", str(recipe), "train.max_steps=4", "train.save_steps=1"]
    assert cli(*args)[0] == 0
    run = tmp_path / "runs" / "junk"
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")  # as if killed after checkpoint-3
    shutil.rmtree(run / "adapter")
    _damage(run / "checkpoints" / "checkpoint-3", "layers.0.self_attn.q_proj.lora_B", 1e30)
    code, _, err = cli(*args, "--resume-from-checkpoint", "auto")
    assert code == 2, err
    assert "gradients became NaN or Inf at step 4" in err and "Traceback" not in err, err
    assert not (run / "adapter").exists()
    assert not (run / "checkpoints" / "checkpoint-4").exists()


def test_a_non_finite_adapter_is_never_saved(tmp_path, tiny_model_dir, chat_file, cli, monkeypatch):
    """A finished run whose last checkpoint holds NaN weights (stopped while saving the
    adapter): resume skips that checkpoint, and past that check, finishing it refuses to write
    the NaN adapter."""
    import shutil

    import lorakit.rundir

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "nan"')
    args = ["run", str(recipe), "train.max_steps=2", "train.save_steps=2"]
    assert cli(*args)[0] == 0
    run = tmp_path / "runs" / "nan"
    shutil.rmtree(run / "adapter")
    _damage(run / "checkpoints" / "checkpoint-2", "lora_B", float("nan"))
    code, _, err = cli(*args, "--resume-from-checkpoint", "auto")
    assert code == 2 and "skipping checkpoint-2: adapter_model.safetensors" in err, err
    assert "NaN or Inf values" in err and not (run / "adapter").exists()
    # the checkpoint check aside, the save itself refuses the weights
    monkeypatch.setattr(lorakit.rundir, "checkpoint_problem", lambda *a, **k: None)
    code, _, err = cli(*args, "--resume-from-checkpoint", "auto")
    assert not (run / "adapter").exists() and not list(run.glob(".adapter.tmp-*"))
    assert code == 2, err
    assert "NaN or Inf weights" in err and "Traceback" not in err, err


@pytest.mark.slow
def test_sigterm_ends_a_run_like_ctrl_c_and_says_how_to_resume(tmp_path, tiny_model_dir, chat_file):
    """``kill`` (SIGTERM) a real run once it has a complete checkpoint: it stops like Ctrl-C
    (exit 130, the MLflow run closed as KILLED, not left RUNNING; no traceback), names what was
    kept and the command that continues it."""
    from mlflow.tracking import MlflowClient

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='[log]\nplugins = ["mlflow"]\n')
    run = tmp_path / "runs" / "termed"
    args = ["run", str(recipe), "output.name=termed", "train.max_steps=400", "train.save_steps=2"]
    args += ['train.lr_scheduler_type="constant"']
    proc = subprocess.Popen(lorakit(*args), env=ENV, stderr=subprocess.PIPE, text=True)
    db = tmp_path / "runs" / "mlflow" / "mlflow.db"

    def mlflow_runs(status: str | None = None) -> list:
        """The MLflow runs named 'termed' (none until the tracker has started its record)."""
        if not db.exists():
            return []
        try:
            client = MlflowClient(f"sqlite:///{db}")
            experiment = client.get_experiment_by_name("lorakit")
            found = client.search_runs([experiment.experiment_id], "attributes.run_name = 'termed'")
        except Exception:  # the logger's thread is still creating the database
            return []
        return [r for r in found if status is None or r.info.status == status]

    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "checkpoint-2" / "LORAKIT_COMPLETE").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint-2"
            time.sleep(0.01)
        # the tracker starts on a thread of its own (creating its database can take seconds on
        # a busy machine): what is tested is that a started record is closed, so wait for it
        while not mlflow_runs("RUNNING"):
            assert proc.poll() is None and time.monotonic() < deadline, "no MLflow run"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "stopped;" in err and "(its newest complete checkpoint)" in err
    line = err.split("continue with: ", 1)[1].splitlines()[0]
    assert line.endswith("--resume-from-checkpoint auto") and "output.name=termed" in line
    (found,) = mlflow_runs()
    assert found.info.status == "KILLED"
