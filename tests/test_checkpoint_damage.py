"""Checkpoints damaged in ways a size check cannot see (issue 21): each is skipped by
``--resume-from-checkpoint auto`` with its reason and refused, in one line, when named."""

from __future__ import annotations

import itertools
import json
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
from helpers import tiny_recipe
from lorakit.rundir import RunDir

pytestmark = pytest.mark.slow

COMMON = (
    "train.save_steps=1",
    'eval.metrics=["eval_loss"]',
    'train.lr_scheduler_type="constant"',  # resumed to a new max_steps
)


def trained(tmp_path, tiny_model_dir, chat_file, cli, name: str, steps: int = 2) -> Path:
    """A real tiny run of ``steps`` steps with a checkpoint per step; its recipe path."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra=f'name = "{name}"')
    code, _, err = cli("run", recipe, f"train.max_steps={steps}", *COMMON)
    assert code == 0, err
    return recipe


def refused(cli, recipe: Path, ckpt: Path, *words: str) -> None:
    code, _, err = cli(
        "run", recipe, "train.max_steps=3", *COMMON, "--resume-from-checkpoint", str(ckpt)
    )
    assert code == 2 and "damaged" in err and "Traceback" not in err, err
    assert all(w in err for w in words), err
    assert len(err.strip().splitlines()[-2:]) <= 2


def resumed_past(cli, recipe: Path, skipped: str, why: str) -> None:
    code, _, err = cli(
        "run", recipe, "train.max_steps=3", *COMMON, "--resume-from-checkpoint", "auto"
    )
    assert code == 0, err
    assert f"skipping {skipped}: {why}" in err and "from checkpoint-1" in err, err


def header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8 : 8 + n])


def with_header(path: Path, new: object, original: bytes) -> None:
    """The file with its header replaced (padded to the old length, so the size still fits)."""
    n = int.from_bytes(original[:8], "little")
    text = json.dumps(new, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(original[:8] + text.ljust(n) + original[8 + n :])


def test_a_safetensors_header_that_lies_is_refused_and_skipped(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """A header that is a JSON list, an entry without data_offsets, offsets that overlap while
    the file size is right, a shape that does not fill its offsets, an unknown dtype."""
    recipe = trained(tmp_path, tiny_model_dir, chat_file, cli, "lies")
    ckpt = tmp_path / "runs" / "lies" / "checkpoints" / "checkpoint-2"
    weights = ckpt / "adapter_model.safetensors"
    original = weights.read_bytes()
    _, head = header(weights)
    spans = sorted((v["data_offsets"], k) for k, v in head.items() if k != "__metadata__")
    first = spans[0][1]
    # two neighbours of one size, the second not the last: pointing it at the first one's
    # bytes keeps every size and the file's length right
    (a, _), (_, second) = next(
        (x, y) for x, y in itertools.pairwise(spans[:-1]) if x[0][1] - x[0][0] == y[0][1] - y[0][0]
    )
    with_header(weights, list(head.values()), original)
    refused(cli, recipe, ckpt, "adapter_model.safetensors", "not an object")

    no_offsets = {**head, first: {k: v for k, v in head[first].items() if k != "data_offsets"}}
    with_header(weights, no_offsets, original)
    refused(cli, recipe, ckpt, "data_offsets")

    # the second tensor points at the first one's bytes: every size still adds up
    overlap = {**head, second: {**head[second], "data_offsets": a}}
    with_header(weights, overlap, original)
    refused(cli, recipe, ckpt, "overlaps")

    wrong_shape = {**head, first: {**head[first], "shape": [1, 1]}}
    with_header(weights, wrong_shape, original)
    refused(cli, recipe, ckpt, "does not fill")

    odd_dtype = {**head, first: {**head[first], "dtype": "F31"}}
    with_header(weights, odd_dtype, original)
    refused(cli, recipe, ckpt, "unknown dtype")

    with_header(weights, overlap, original)
    resumed_past(cli, recipe, "checkpoint-2", "adapter_model.safetensors: bad header")


def test_a_global_step_that_is_not_the_folders_is_refused_and_skipped(
    tmp_path, tiny_model_dir, chat_file, cli
):
    recipe = trained(tmp_path, tiny_model_dir, chat_file, cli, "steps")
    ckpt = tmp_path / "runs" / "steps" / "checkpoints" / "checkpoint-2"
    state_file = ckpt / "trainer_state.json"
    text = state_file.read_text()
    assert '"global_step": 2,' in text
    for bad in ("Infinity", "NaN", "-2", "2.5", "true", '"2"'):
        state_file.write_text(text.replace('"global_step": 2,', f'"global_step": {bad},'))
        refused(cli, recipe, ckpt, "trainer_state.json")
    state_file.write_text(text.replace('"global_step": 2,', '"global_step": 7,'))
    refused(cli, recipe, ckpt, "global_step 7 is not the folder's step 2")
    resumed_past(cli, recipe, "checkpoint-2", "trainer_state.json: global_step 7")


def test_nan_adapter_weights_in_a_checkpoint_are_refused_and_skipped(
    tmp_path, tiny_model_dir, chat_file, cli
):
    recipe = trained(tmp_path, tiny_model_dir, chat_file, cli, "nan")
    ckpt = tmp_path / "runs" / "nan" / "checkpoints" / "checkpoint-2"
    weights = ckpt / "adapter_model.safetensors"
    n, head = header(weights)
    name = next(k for k, v in head.items() if k != "__metadata__" and v["dtype"] == "F32")
    start = 8 + n + head[name]["data_offsets"][0]
    raw = bytearray(weights.read_bytes())
    raw[start : start + 8] = struct.pack("<ff", float("nan"), float("inf"))
    weights.write_bytes(bytes(raw))
    refused(cli, recipe, ckpt, "adapter_model.safetensors", "NaN or Inf")
    resumed_past(cli, recipe, "checkpoint-2", "adapter_model.safetensors")


def test_a_checkpoint_from_another_run_is_skipped_and_refused(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """A checkpoint copied (or symlinked) into a run's folder from another run with the same
    recipe: auto skips it, naming it foreign; named explicitly it is refused."""
    trained(tmp_path, tiny_model_dir, chat_file, cli, "donor", steps=3)
    recipe = trained(tmp_path, tiny_model_dir, chat_file, cli, "host")
    donor = tmp_path / "runs" / "donor" / "checkpoints"
    host = RunDir(tmp_path / "runs" / "host")
    shutil.copytree(donor / "checkpoint-3", host.checkpoints / "checkpoint-3")
    skipped: list[tuple[str, str]] = []
    chosen = host.resolve_checkpoint("auto", on_skip=lambda c, why: skipped.append((c.name, why)))
    assert chosen.name == "checkpoint-2"
    assert skipped and skipped[0][0] == "checkpoint-3" and "another run" in skipped[0][1]
    refused(cli, recipe, host.checkpoints / "checkpoint-3", "written by another run")
    shutil.rmtree(host.checkpoints / "checkpoint-3")
    (host.checkpoints / "checkpoint-3").symlink_to(donor / "checkpoint-3")
    skipped.clear()
    chosen = host.resolve_checkpoint("auto", on_skip=lambda c, why: skipped.append((c.name, why)))
    assert chosen.name == "checkpoint-2" and "another run" in skipped[0][1]
    code, _, err = cli(  # max_steps 3: checkpoint-3 is not past the end, only foreign
        "run", recipe, "train.max_steps=3", *COMMON, "--resume-from-checkpoint", "auto"
    )
    assert code == 0 and "skipping checkpoint-3: it was written by another run" in err, err


def _hidden_os_system(command: str) -> bytes:
    """A pickle that calls os.system, where the last two strings before STACK_GLOBAL are
    ``torch``, ``Size`` (pushed and popped again): an opcode scan sees torch.Size."""

    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()  # SHORT_BINUNICODE

    body = text("os") + text("system") + text("torch") + text("Size") + b"00"  # POP POP
    body += b"\x93" + text(command) + b"\x85" + b"R"  # STACK_GLOBAL, TUPLE1, REDUCE
    return b"\x80\x04" + body + b"."


def test_a_pickle_that_hides_code_behind_pops_is_refused_without_a_traceback(
    tmp_path, tiny_model_dir, chat_file, cli
):
    recipe = trained(tmp_path, tiny_model_dir, chat_file, cli, "hidden")
    ckpt = tmp_path / "runs" / "hidden" / "checkpoints" / "checkpoint-2"
    marker = tmp_path / "code-ran"
    path = ckpt / "rng_state.pth"
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w") as z:
        for n, data in entries.items():
            z.writestr(n, _hidden_os_system(f"touch {marker}") if n.endswith("data.pkl") else data)
    code, _, err = cli(
        "run", recipe, "train.max_steps=3", *COMMON, "--resume-from-checkpoint", str(ckpt)
    )
    assert code == 2 and "rng_state.pth" in err and "names os.system" in err, err
    assert "weights_only" not in err and "Traceback" not in err
    resumed_past(cli, recipe, "checkpoint-2", "rng_state.pth is refused")
    assert not marker.exists(), "the pickle's code ran"


def test_a_named_checkpoint_without_its_marker_is_incomplete_not_foreign(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """A checkpoint whose save was cut short (no LORAKIT_COMPLETE, trainer_state.json written)
    is refused as incomplete, not as another run's ("no run id in its marker")."""
    recipe = trained(tmp_path, tiny_model_dir, chat_file, cli, "unmarked")
    ckpt = tmp_path / "runs" / "unmarked" / "checkpoints" / "checkpoint-2"
    (ckpt / "LORAKIT_COMPLETE").unlink()
    assert (ckpt / "trainer_state.json").is_file()
    code, _, err = cli(
        "run", recipe, "train.max_steps=3", *COMMON, "--resume-from-checkpoint", str(ckpt)
    )
    assert code == 2 and "Traceback" not in err, err
    assert "is incomplete (no LORAKIT_COMPLETE marker)" in err and "killed while saving" in err
    assert "another run" not in err and "damaged" not in err, err
