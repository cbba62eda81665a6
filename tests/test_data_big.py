"""Big data sets in bounded memory (issue 21): ``check`` and ``prepare`` stream the examples to
split files and tokenize a batch at a time, so their peak memory does not grow with the data;
the streamed splits are exactly :func:`assign_splits`' splits."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import write_big_chat, write_jsonl, write_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lorakit.catalog import default_catalog
from lorakit.components import build_components
from lorakit.data.pipeline import (
    DataReport,
    Splits,
    _SeenIds,
    load_splits,
    read_examples,
    read_split_files,
    write_splits,
)
from lorakit.data.splits import assign_splits, fingerprint
from lorakit.data.spool import SpooledExamples
from lorakit.recipe import load_recipe

MAIN = "import sys; from lorakit.cli.main import main; sys.exit(main(sys.argv[1:]))"


def measure(*args: str) -> float:
    """Peak RSS (MB) of one ``lorakit`` process, from ``wait4`` on that process alone."""
    proc = subprocess.Popen(
        [sys.executable, "-c", MAIN, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    timer = threading.Timer(120, proc.kill)
    timer.start()
    try:
        err = proc.stderr.read() if proc.stderr else b""
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, err.decode()[-2000:]
    return usage.ru_maxrss / 1024


@pytest.mark.slow  # four CLI subprocesses: about 4 s of CPU
def test_check_and_prepare_memory_does_not_grow_with_the_data(tmp_path, data_tokenizer_dir):
    """6x the data, the same peak memory. Before issue 21 the examples were held as objects
    and every token as a Python int: `check` grew by about 150 bytes per byte of this data
    (1 MB took 181 MB, 4 MB 618 MB) and `prepare` by about 2."""
    peaks: dict[str, list[float]] = {"check": [], "prepare": []}
    for mb in (0.5, 3.0):
        folder = tmp_path / f"d{mb}"
        folder.mkdir()
        write_big_chat(folder / "big.jsonl", int(mb * 1e6))
        recipe = write_recipe(
            folder,
            [{"plugin": "chat_jsonl", "path": "big.jsonl"}],
            format={"plugin": "chatml"},
            train={"max_length": 1024},
        )
        tok = str(data_tokenizer_dir)
        peaks["check"].append(measure("check", str(recipe), "--tokenizer", tok))
        peaks["prepare"].append(measure("prepare", str(recipe)))
    for verb, (small, big) in peaks.items():
        assert big - small < 8, f"{verb}: peak RSS {small:.0f} MB -> {big:.0f} MB for 6x the data"


def _recipe(folder: Path, records: list[dict], **data) -> tuple:
    write_jsonl(folder / "d.jsonl", records)
    path = write_recipe(folder, [{"plugin": "chat_jsonl", "path": "d.jsonl"}], data=data)
    catalog = default_catalog()
    recipe = load_recipe(path, (), catalog)
    return recipe, build_components(recipe, catalog)


def _record(i: int, answer: int, split: str | None) -> dict:
    rec: dict = {
        "id": f"e{i}",
        "messages": [
            {"role": "user", "content": f"q{answer}"},
            {"role": "assistant", "content": f"a{answer}"},
        ],
    }
    if split:
        rec["meta"] = {"split": split}
    return rec


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    answers=st.lists(st.integers(0, 12), min_size=1, max_size=40),
    pins=st.lists(st.sampled_from([None, None, None, "train", "val", "test"]), min_size=40),
    seed=st.integers(0, 3),
)
def test_streamed_splits_are_assign_splits(tmp_path_factory, answers, pins, seed):
    """Identical conversations (few distinct answers) pinned anywhere, earlier or later: the
    spooled splits hold the same examples in the same order as ``assign_splits`` on the whole
    list, or both raise; the fingerprint is the one of the examples."""
    folder = tmp_path_factory.mktemp("s")
    # one pin per content, so no two identical examples are pinned to different splits
    pin_of = {a: pins[a] for a in set(answers)}
    records = [_record(i, a, pin_of[a] if pins[i] else None) for i, a in enumerate(answers)]
    recipe, parts = _recipe(folder, records, val_fraction=0.3, test_fraction=0.2, split_seed=seed)
    examples = read_examples(parts.sources, recipe.data, recipe.recipe_dir, DataReport())
    want = assign_splits(examples, seed, 0.3, 0.2)
    splits = load_splits(parts.sources, recipe.data, recipe.recipe_dir)
    for name in ("train", "val", "test"):
        got = splits.get(name)
        assert isinstance(got, SpooledExamples)
        assert list(got) == want[name]
        assert [got[i] for i in range(len(got))] == want[name]
        assert got[1:] == want[name][1:] and got[::-1] == want[name][::-1]
    assert splits.fingerprint == fingerprint([*want["train"], *want["val"], *want["test"]])


def test_identical_examples_pinned_apart_is_the_same_error(tmp_path):
    records = [_record(0, 1, None), _record(1, 1, "val"), _record(2, 1, "test")]
    recipe, parts = _recipe(tmp_path, records)
    try:
        load_splits(parts.sources, recipe.data, recipe.recipe_dir)
    except Exception as exc:
        assert "examples e1 and e2 are identical but meta.split puts them in val and test" in str(
            exc
        )
    else:
        raise AssertionError("no error")


def test_split_files_round_trip_and_spools_are_removed(tmp_path):
    records = [_record(i, i, None) for i in range(30)]
    recipe, parts = _recipe(tmp_path, records, val_fraction=0.2, test_fraction=0.1)
    splits = load_splits(parts.sources, recipe.data, recipe.recipe_dir)
    spool = splits.train.path.parent  # type: ignore[attr-defined]
    write_splits(tmp_path / "out", splits)
    again = read_split_files(tmp_path / "out")
    assert again is not None and again.fingerprint == splits.fingerprint
    as_lists = Splits(train=list(splits.train), val=list(splits.val), test=list(splits.test))
    write_splits(tmp_path / "lists", as_lists)
    for name in ("train", "val", "test"):  # the same bytes as lists of examples write
        assert (tmp_path / "out" / f"{name}.jsonl").read_bytes() == (
            tmp_path / "lists" / f"{name}.jsonl"
        ).read_bytes()
    assert spool.is_dir()
    del splits, as_lists
    gc.collect()
    assert not spool.exists(), "the temporary spool folder outlives its splits"


def test_duplicate_ids_are_found_through_hash_collisions():
    """Ids are kept as hashes; a match is confirmed against the record, so two ids that share a
    hash are not duplicates and a real duplicate is found whatever shares its hash."""

    class Ex:
        def __init__(self, rid: str):
            self.id = rid

    kept: list = []
    seen = _SeenIds(lambda i: kept[i])
    seen.hash = lambda rid: 0  # type: ignore[method-assign]  # every id collides
    for rid in ("a", "b", "c"):
        assert seen.first(rid) is None
        seen.add(rid, len(kept))
        kept.append(Ex(rid))
    assert seen.first("a") is kept[0]
    assert seen.first("c") is kept[2]
    assert seen.first("d") is None
