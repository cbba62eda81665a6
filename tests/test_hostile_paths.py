"""Paths that are not what lorakit expects: a read-only ``output.dir`` or one under a regular file,
a dangling link as ``output.name``, FIFOs and device links inside a data folder, and links
planted inside a run folder. Each is a message with the key or file and a fix, exit 2, no
traceback, and nothing is read or written through them. Real processes, real FIFOs, links and
(where the kernel lets us) a real read-only mount."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, chat_records, tiny_recipe, write_jsonl, write_recipe

MAIN = "import sys; from lorakit.cli.main import main; sys.exit(main(sys.argv[1:]))"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO / "core"), str(REPO / "plugins")]),
    "PYTHONWARNINGS": "ignore",
    "HF_HUB_OFFLINE": "1",
}


def lorakit(*args: object, wrap: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(wrap or []), sys.executable, "-c", MAIN, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)


def _recipe(tmp_path: Path, model_dir: Path) -> Path:
    """The tiny model's recipe: ``run`` loads the data and the tokenizer, then stops at the
    folder before training."""
    return tiny_recipe(tmp_path, model_dir, write_jsonl(tmp_path / "data.jsonl", chat_records(12)))


def read_only(folder: Path) -> list[str]:
    """A command prefix under which ``folder`` is read-only: a read-only bind mount in a mount
    namespace of its own (root ignores permission bits), or mode 0555 for anyone else."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    if shutil.which("unshare") is None:
        pytest.skip("root without unshare: no way to make a read-only folder")
    script = (
        f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}" && exec "$@"'
    )
    wrap = ["unshare", "-m", "sh", "-c", script, "sh"]
    probe = subprocess.run([*wrap, "touch", str(folder / "probe")], capture_output=True)
    if probe.returncode == 0 or "Read-only" not in probe.stderr.decode():
        (folder / "probe").unlink(missing_ok=True)
        pytest.skip("this kernel does not let root make a read-only bind mount")
    return wrap


# --------------------------------------------------------------------------- output.dir


# `run` loads the training stack before it reaches the claim (about 4 s of CPU)
VERBS = ["prepare", pytest.param("run", marks=pytest.mark.slow)]


@pytest.mark.parametrize("verb", VERBS)
def test_a_read_only_output_dir_is_a_clear_error(verb, tmp_path, tiny_model_dir):
    outdir = tmp_path / "ro"
    outdir.mkdir()
    recipe = _recipe(tmp_path, tiny_model_dir)
    done = lorakit(verb, recipe, f"output.dir={outdir}", wrap=read_only(outdir))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "output.dir" in done.stderr and str(outdir) in done.stderr, done.stderr
    assert "not writable" in done.stderr and "fix:" in done.stderr, done.stderr


@pytest.mark.parametrize("verb", VERBS)
def test_an_output_dir_under_a_regular_file_is_a_clear_error(verb, tmp_path, tiny_model_dir):
    (tmp_path / "afile").write_text("x")
    recipe = _recipe(tmp_path, tiny_model_dir)
    done = lorakit(verb, recipe, f"output.dir={tmp_path / 'afile' / 'runs'}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "output.dir" in done.stderr and "is a file, not a folder" in done.stderr, done.stderr
    assert str(tmp_path / "afile") in done.stderr and "fix:" in done.stderr
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("verb", VERBS)
def test_a_file_as_the_run_folder_names_output_name(verb, tmp_path, tiny_model_dir):
    """The file in the way is the run folder itself: output.name is what to change, not
    output.dir (which is a folder)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "afile").write_text("x")
    done = lorakit(verb, _recipe(tmp_path, tiny_model_dir), "output.name=afile")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "output.name" in done.stderr and "is a file, not a folder" in done.stderr, done.stderr
    assert "set output.dir" not in done.stderr, done.stderr
    assert "choose another output.name" in done.stderr, done.stderr
    assert (runs / "afile").read_text() == "x"


def test_a_dangling_link_as_output_name_is_a_clear_error_in_prepare(tmp_path, tiny_model_dir):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "r").symlink_to(tmp_path / "nowhere")
    done = lorakit("prepare", _recipe(tmp_path, tiny_model_dir), "output.name=r")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "symbolic link" in done.stderr and "output.name" in done.stderr, done.stderr
    assert not (tmp_path / "nowhere").exists()


# --------------------------------------------------------------------------- data folders


def test_fifos_devices_and_dangling_links_in_a_data_folder_are_reported_not_read(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "good.jsonl", chat_records(12))
    os.mkfifo(data / "pipe.jsonl")  # opening it would block until a writer comes: never opened
    (data / "zero.jsonl").symlink_to("/dev/zero")  # reading it would never end
    (data / "gone.jsonl").symlink_to(tmp_path / "missing.jsonl")
    recipe = write_recipe(tmp_path, [{"plugin": "chat_jsonl", "path": "data"}])
    done = lorakit("check", recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "source 0:chat_jsonl: 12 examples" in out, out
    for name, what in [
        ("pipe.jsonl", "a FIFO"),
        ("zero.jsonl", "a device"),
        ("gone.jsonl", "a symbolic link to nothing"),
    ]:
        line = next((x for x in out.splitlines() if name in x), "")
        assert "skipped" in line and what in line, out

    done = lorakit("prepare", recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pipe.jsonl" in done.stdout


# --------------------------------------------------------------------------- links in a run


def test_a_run_folder_started_again_is_never_written_through_a_planted_link(tmp_path):
    """A folder whose attempt left nothing to continue is started again; a ``recipe.toml``
    planted there as a link to another file was overwritten through the link."""
    from lorakit.errors import RunError
    from lorakit.rundir import RunDir

    victim = tmp_path / "precious.toml"
    victim.write_text("keep me\n")
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "recipe.toml").symlink_to(victim)
    with pytest.raises(RunError, match="symbolic links") as info:
        try:
            RunDir(run).start("new recipe", {}, [], "h", Path("r.toml"))
        finally:
            RunDir.release_all()
    assert f"recipe.toml -> {victim}" in str(info.value) and "remove the links" in str(info.value)
    assert victim.read_text() == "keep me\n"
    assert not (run / "run.json").exists()


def test_run_files_are_replaced_never_written_through(tmp_path):
    """Every JSON file and report of a run is written to a fresh temporary file and renamed: a
    link at the target (or at the temporary name) is replaced, the file it points to is kept."""
    from lorakit.rundir import write_json
    from lorakit.safe_files import write_text

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("run.json", "report.md"):
        (run / name).symlink_to(victim)
    write_json(run / "run.json", {"a": 1})
    write_text(run / "report.md", "# report\n")
    assert victim.read_text() == "keep me\n"
    assert not (run / "run.json").is_symlink() and (run / "report.md").read_text() == "# report\n"
    assert sorted(p.name for p in run.iterdir()) == ["report.md", "run.json"]


def test_prepare_never_writes_splits_through_a_planted_folder_link(tmp_path, tiny_model_dir):
    outside = tmp_path / "outside"
    outside.mkdir()
    splits = tmp_path / "runs" / "recipe" / "data" / "splits"
    splits.parent.mkdir(parents=True)
    splits.symlink_to(outside, target_is_directory=True)
    done = lorakit("prepare", _recipe(tmp_path, tiny_model_dir))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "data/splits -> " in done.stderr and "fix:" in done.stderr, done.stderr
    assert list(outside.iterdir()) == []


@pytest.mark.slow  # trains the tiny model once
def test_commands_on_a_run_refuse_links_planted_in_it(tmp_path, tiny_model_dir, cli):
    """A trained run with its test split or its eval report replaced by a link to a file
    elsewhere: eval, export, generate and a resume name the link and read or write nothing
    through it (eval rewrote report.md and read the linked split)."""
    recipe = _recipe(tmp_path, tiny_model_dir)
    code, _, err = cli("run", recipe, "train.max_steps=2", 'eval.metrics=["eval_loss"]')
    assert code == 0, err
    run = tmp_path / "runs" / "recipe"
    victim = tmp_path / "precious.jsonl"
    for planted in ("data/splits/test.jsonl", "report.md"):
        victim.write_text("keep me\n")
        (run / planted).unlink()
        (run / planted).symlink_to(victim)
        for args in (
            ["eval", run],
            ["export", run],
            ["generate", run, "--prompt", "hi"],
            ["run", recipe, "train.max_steps=3", "--resume-from-checkpoint", "auto"],
        ):
            code, _, err = cli(*args)
            assert code == 2, (args, err)
            assert f"{planted} -> {victim}" in err and "fix:" in err, (args, err)
            assert "Traceback" not in err
        assert victim.read_text() == "keep me\n"
        (run / planted).unlink()
        (run / planted).write_text("")
    assert not (run / "export").exists()


def test_an_empty_path_is_refused_where_sources_resolve_paths(tmp_path):
    """Path("") is the recipe's folder: a source (a third-party one too) that resolves an empty
    path through lorakit.api gets an error naming its key, not the folder read recursively."""
    from lorakit.api import DataError, expand_files, resolve_path

    write_jsonl(tmp_path / "old-run.jsonl", chat_records(2))
    with pytest.raises(DataError, match="the path is empty") as info:
        expand_files(tmp_path, "", "**/*.jsonl", "path")
    assert info.value.where == "[data.sources].path" and '"."' in (info.value.fix or "")
    with pytest.raises(DataError, match="the path is empty"):
        resolve_path(tmp_path, "")
    assert expand_files(tmp_path, ".", "**/*.jsonl", "path") == [tmp_path / "old-run.jsonl"]
