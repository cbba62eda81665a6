"""The run folder's claim, with real concurrent processes (no training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHILD = """
import sys, time
from pathlib import Path
from lorakit.errors import RunError
from lorakit.rundir import RunDir

check = RunDir._check_restartable
def widened(self):
    check(self)
    time.sleep(1.0)  # a slow file system: time between "the owner is gone" and the claim
RunDir._check_restartable = widened
go, ready = Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()  # imports done: the parent starts both at once only after both are here
while not go.exists():
    time.sleep(0.002)
try:
    RunDir(Path(sys.argv[1])).start("", {}, [], "h", Path("r.toml"))
    print("claimed", flush=True)
    release = go.with_name("release")
    while not release.exists():  # hold the claim until the parent has both answers
        time.sleep(0.01)
except RunError as exc:
    print("refused:", exc, flush=True)
"""


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_two_restarts_of_an_abandoned_folder_at_once_one_claims_it(tmp_path):
    """An attempt that died before its first checkpoint leaves a claim naming a dead pid; two
    processes restarting it at the same instant must not both proceed. The window between
    "the owner is gone" and taking the claim is widened to a second in both."""
    run = tmp_path / "runs" / "abandoned"
    run.mkdir(parents=True)
    (run / ".lorakit-claim").write_text(f"{dead_pid()}\n")
    (run / "run.json").write_text(json.dumps({"history": [{"event": "start"}]}))
    (tmp_path / "child.py").write_text(CHILD)
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "child.py"), str(run), str(go), str(r)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready):  # both children waiting at the barrier
        assert time.monotonic() < deadline, "the children did not start"
        time.sleep(0.01)
    go.touch()
    outs = [p.stdout.readline() for p in procs if p.stdout]  # the claimer still holds it
    (tmp_path / "release").touch()
    for p in procs:
        p.communicate(timeout=60)
    assert sorted(o.split(":")[0].strip() for o in outs) == ["claimed", "refused"], outs
    assert "in use by another lorakit process" in "".join(outs)
    history = json.loads((run / "run.json").read_text())["history"]
    assert [e["event"] for e in history] == ["start", "stopped before a checkpoint", "restart"]


def test_a_claim_is_free_again_when_its_owner_dies(tmp_path):
    """The lock goes with the process (here: killed), so the folder can be restarted."""
    run = tmp_path / "r"
    code = (
        "import sys, time; from pathlib import Path; from lorakit.rundir import RunDir\n"
        f"RunDir(Path({str(run)!r})).start('', {{}}, [], 'h', Path('r.toml'))\n"
        "print('claimed', flush=True); time.sleep(60)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "claimed"
    from lorakit.errors import RunError
    from lorakit.rundir import RunDir

    try:
        RunDir(run).start("", {}, [], "h", Path("r.toml"))
        raise AssertionError("a live owner's folder was claimed")
    except RunError as exc:
        assert "in use" in str(exc)
    import fcntl

    with (run / ".lorakit-claim").open("rb") as f:  # the file on disk is the one locked
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            raise AssertionError("the claim file is not locked by its owner")
        except BlockingIOError:
            pass
    p.kill()
    p.wait()
    assert RunDir(run).start("", {}, [], "h", Path("r.toml")) is True


def test_a_finished_run_gives_its_claim_back(tmp_path):
    """In one process (a notebook, the test suite) the claim lasts as long as the run: after
    it, another process may resume the folder."""
    from lorakit.rundir import RunDir

    run = RunDir(tmp_path / "r")
    run.start("", {}, [], "h", Path("r.toml"))
    RunDir.release_all()
    assert (run.path / ".lorakit-claim").read_text() == ""
    code = (
        "from pathlib import Path; from lorakit.rundir import RunDir\n"
        f"RunDir(Path({str(run.path)!r})).record_resume(Path('c'), [])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_claim_whose_pid_now_belongs_to_another_process_is_free(tmp_path):
    """An abandoned claim names a pid that the system has since given to an unrelated process:
    the flock answers who holds the folder (nobody), not the pid."""
    from lorakit.rundir import RunDir

    run = tmp_path / "runs" / "abandoned"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"history": [{"event": "start"}]}))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lorakit-claim").write_text(f"{other.pid}\n")
        assert RunDir(run).start("", {}, [], "h", Path("r.toml")) is True
        assert (run / ".lorakit-claim").read_text().strip() == str(os.getpid())
    finally:
        RunDir.release_all()
        other.kill()
        other.wait()


def test_a_checkpoint_cut_short_leaves_a_folder_that_starts_again(tmp_path):
    """A run killed while it wrote checkpoint-1 has no complete checkpoint: resume has nothing
    to continue, so `run` starts it again (and removes the unfinished save)."""
    from lorakit.rundir import RunDir

    run = RunDir(tmp_path / "runs" / "cut")
    run.path.mkdir(parents=True)
    (run.path / "run.json").write_text(json.dumps({"history": [{"event": "start"}]}))
    partial = run.checkpoints / "checkpoint-1"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"half a file")
    try:
        assert run.nothing_to_continue()
        assert run.start("", {}, [], "h", Path("r.toml")) is True
        assert not partial.exists()
    finally:
        RunDir.release_all()


def test_a_planted_claim_link_is_never_written_through(tmp_path):
    """`.lorakit-claim` planted as a symbolic link to another file: the claim is refused and
    the file it points to keeps its bytes (the pid is written in place, truncating)."""
    from lorakit.errors import RunError
    from lorakit.rundir import RunDir

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / ".lorakit-claim").symlink_to(victim)
    try:
        RunDir(run).start("", {}, [], "h", Path("r.toml"))
        raise AssertionError("a claim was taken through a symbolic link")
    except RunError as exc:
        assert "symbolic link" in str(exc) and "remove it" in str(exc)
    finally:
        RunDir.release_all()
    assert victim.read_text() == "keep me\n"
    assert not (run / "run.json").exists()


def test_a_run_json_that_is_not_an_object_is_a_clear_error(tmp_path, cli):
    """A damaged or hand-edited run.json (a list, or not JSON) is named with a fix by every
    command that reads it, never a traceback (``rundir.read_json``)."""
    run = tmp_path / "runs" / "damaged"
    run.mkdir(parents=True)
    for text, what in (("[1, 2]", "holds a JSON list, not an object"), ("{oops", "not valid JSON")):
        (run / "run.json").write_text(text)
        for verb in (("eval", str(run)), ("export", str(run))):
            code, out, err = cli(*verb)
            assert code == 2, (verb, err)
            assert f"{run / 'run.json'}" in err and what in err, err
            assert "Traceback" not in out + err


@pytest.mark.slow
def test_a_folder_that_is_not_a_run_is_refused_and_left_as_it_was(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """A user's own folder of the run's name is never claimed: its recipe.toml is not
    replaced, nor its metrics.jsonl appended to. A folder `lorakit prepare` made (data/splits/
    and nothing else) is still a run's to claim."""
    from helpers import tiny_recipe

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file)
    mine = tmp_path / "runs" / "userdir"
    mine.mkdir(parents=True)
    (mine / "recipe.toml").write_text("notes\n")
    (mine / "metrics.jsonl").write_text('{"mine":1}\n')
    before = sorted(p.name for p in mine.iterdir())
    for verb in ("run", "prepare"):
        code, out, err = cli(verb, recipe, "output.name=userdir", "train.max_steps=1")
        assert code == 2 and "Traceback" not in out + err, err
        assert "is not a run folder" in err and "metrics.jsonl, recipe.toml" in err, err
        assert "output.name" in err and "fix:" in err, err
        assert sorted(p.name for p in mine.iterdir()) == before, verb
        assert (mine / "recipe.toml").read_text() == "notes\n"
        assert (mine / "metrics.jsonl").read_text() == '{"mine":1}\n'
    code, _, err = cli("prepare", recipe, "output.name=prepared")
    assert code == 0, err
    code, _, err = cli("run", recipe, "output.name=prepared", "train.max_steps=1")
    assert code == 0, err
    assert (tmp_path / "runs" / "prepared" / "run.json").is_file()
