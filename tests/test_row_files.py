"""Tokenized rows in memory-mapped files (issue 21): ``tokenize_examples`` writes the rows ``run``
trains on to unnamed temporary files and reads them back through memory maps, so the run's data
phase does not hold the token arrays in memory; the rows are exactly the in-memory ones."""

from __future__ import annotations

import collections
import json
import os
import pickle
import subprocess
import sys
import threading
from array import array
from pathlib import Path

import pytest
from helpers import tiny_recipe, write_big_chat
from hypothesis import given, settings
from hypothesis import strategies as st
from lorakit.catalog import default_catalog
from lorakit.components import build_components
from lorakit.data.pipeline import (
    DataReport,
    apply_overlength,
    iter_tokenized,
    supervised_share,
    tokenize_examples,
)
from lorakit.data.row_files import RowWriter, TokenRows, row_lengths
from lorakit.data.spool import example_from_json
from lorakit.data.tokenize import IGNORE_INDEX, Tokenized
from lorakit.recipe import load_recipe

PairLike = collections.namedtuple("PairLike", "chosen rejected")

rows_strategy = st.lists(
    st.lists(st.tuples(st.integers(0, 2**31 - 1), st.booleans()), min_size=0, max_size=40).map(
        lambda toks: Tokenized(
            array("i", [t for t, _ in toks]),
            array("i", [t if sup else IGNORE_INDEX for t, sup in toks]),
        )
    ),
    max_size=30,
)


def _written(rows: list[Tokenized], batches: int = 3) -> TokenRows:
    writer = RowWriter()
    for k in range(batches):  # added a batch at a time, as tokenize_examples does
        writer.add(rows[k * len(rows) // batches : (k + 1) * len(rows) // batches])
    return writer.finish()


@settings(max_examples=60, deadline=None)
@given(rows=rows_strategy)
def test_rows_read_back_from_their_files_are_the_rows_written(rows):
    """Index, negative index, slice, iterate, lengths, supervised count, pickle: each gives
    the rows written, in order, as ``array("i")`` like in-memory rows."""
    stored = _written(rows)
    assert len(stored) == len(rows)
    assert stored == rows and list(stored) == rows
    assert all(isinstance(r.input_ids, array) and r.input_ids.typecode == "i" for r in stored)
    for i in range(-len(rows), len(rows)):
        assert stored[i] == rows[i]
    assert stored[1:-1:2] == rows[1:-1:2]
    assert row_lengths(stored) == [len(r.input_ids) for r in rows]
    assert stored.supervised_tokens == sum(r.n_supervised for r in rows)
    assert stored.total_tokens == sum(len(r.input_ids) for r in rows)
    assert supervised_share(stored) == supervised_share(rows)  # data_report.json's share
    pairs = [PairLike(chosen=r, rejected=Tokenized(array("i"), array("i"))) for r in rows]
    assert supervised_share(pairs) == supervised_share(rows)  # a pair counts its chosen side
    assert pickle.loads(pickle.dumps(stored)) == rows  # a "spawn" data loader worker's copy
    with pytest.raises(IndexError):
        stored[len(rows)]


def test_tokenize_examples_gives_the_rows_tokenized_in_memory(tmp_path, data_tokenizer):
    """The rows ``run`` trains on (through the files) equal the rows the tokenizer gave (kept
    in memory, as before), with the same drops and truncations counted."""
    write_big_chat(tmp_path / "d.jsonl", 60_000, seed=3)  # questions and answers of many lengths
    records = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    recipe_path = tiny_recipe(tmp_path, tmp_path, tmp_path / "d.jsonl")
    catalog = default_catalog()
    recipe = load_recipe(recipe_path, (), catalog)
    formatter = build_components(recipe, catalog).formatter
    examples = [example_from_json(r) for r in records]
    for policy in ("truncate", "drop"):
        expected_report, report = DataReport(), DataReport()
        expected = [
            row
            for pieces, rows in iter_tokenized(
                examples, formatter, data_tokenizer, 128, expected_report, batch=64
            )
            for row in apply_overlength(pieces, rows, 128, policy, expected_report)
        ]
        stored = tokenize_examples(examples, formatter, data_tokenizer, 128, policy, report)
        assert isinstance(stored, TokenRows)
        assert expected and stored == expected
        assert report.to_json() == expected_report.to_json()
        assert report.truncated or report.dropped  # the policy was exercised
        assert len(stored) < len(examples) and report.dropped


KILLED = """
import os, signal, sys
from array import array
from lorakit.data.row_files import RowWriter
from lorakit.data.tokenize import Tokenized
writer = RowWriter()
writer.add([Tokenized(array("i", range(1000)), array("i", range(1000)))] * 100)
rows = writer.finish()
assert rows[99].input_ids[999] == 999
print(len(os.listdir(sys.argv[1])), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_row_files_leave_nothing_on_disk_even_when_killed(tmp_path):
    """The files have no name (``O_TMPFILE``): nothing to remove while the process lives,
    nothing left behind when it is SIGKILLed holding them."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    env = {**os.environ, "TMPDIR": str(folder)}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED, str(folder)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.strip() == "0"  # no file named while the rows were in use
    assert list(folder.iterdir()) == []


PHASE = """
import sys
from lorakit.rundir import RunDir
from lorakit.runner import Start, prepare_data
from lorakit.session import open_session
session = open_session(sys.argv[1], ("train.max_length=1024",))
data = prepare_data(session.recipe, session.components, RunDir(session.recipe.run_dir), Start())
print(len(data.train_rows), data.train_rows.total_tokens)
"""


def _data_phase(recipe: Path) -> tuple[float, int]:
    """(peak RSS in MB, tokens kept) of ``run``'s data phase in a process of its own."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PHASE, str(recipe)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    timer = threading.Timer(300, proc.kill)
    timer.start()
    try:
        out = proc.stdout.read() if proc.stdout else ""
        err = proc.stderr.read() if proc.stderr else ""
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    assert os.waitstatus_to_exitcode(status) == 0, err[-2000:]
    return usage.ru_maxrss / 1024, int(out.split()[1])


@pytest.mark.slow  # two processes that load the training stack and tokenize 7.5 MB: ~20 s CPU
def test_the_run_data_phase_memory_does_not_grow_with_the_token_arrays(tmp_path, tiny_model_dir):
    """4x the data, the same peak memory: the rows are not held in memory. Before, ``run``'s
    data phase kept them as arrays (8 bytes a token plus a few objects a row): 1.5 MB of chat
    peaked at 390 MB and 6 MB at 417 MB (+27 MB, with 20 MB more token arrays); with the rows
    memory-mapped, 390 MB and 391 MB."""
    peaks, tokens = [], []
    for mb in (1.5, 6.0):
        folder = tmp_path / f"d{mb}"
        folder.mkdir()
        write_big_chat(folder / "big.jsonl", int(mb * 1e6))
        peak, n = _data_phase(tiny_recipe(folder, tiny_model_dir, folder / "big.jsonl"))
        peaks.append(peak)
        tokens.append(n)
    arrays = 8 * (tokens[1] - tokens[0]) / 2**20  # MB the larger set's rows add in memory
    assert arrays > 16  # large enough that rows held in memory would show
    assert peaks[1] - peaks[0] < arrays / 4, (
        f"peak RSS {peaks[0]:.0f} MB -> {peaks[1]:.0f} MB for {arrays:.0f} MB more token arrays"
    )
