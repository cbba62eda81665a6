"""Files that are not what a verb expects get a message naming the file, not a wrong one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.mark.parametrize("kind", ["device", "fifo", "directory", "missing", "latin-1"])
def test_generate_file_that_is_not_a_text_file_says_what_it_is(kind, tmp_path):
    from lorakit.cli.generate import read_prompts
    from lorakit.errors import DataError

    path = {"device": Path("/dev/zero")}.get(kind, tmp_path / "prompts.txt")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "latin-1":
        path.write_bytes(b"caf\xe9\n")
    expected = {
        "device": "not a regular file",
        "fifo": "not a regular file",
        "directory": "is a directory",
        "missing": "does not exist",
        "latin-1": "not UTF-8",
    }[kind]
    with pytest.raises(DataError, match=expected) as info:
        read_prompts([], path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content",
    ["{not json", "[1, 2]", '{"results": 3}', '{"results": [1]}', '{"results": [{"metrics": []}]}'],
)
def test_compare_names_a_malformed_eval_report(content, tmp_path, cli):
    report = tmp_path / "runs" / "r1" / "eval_report.json"
    report.parent.mkdir(parents=True)
    report.write_text(content)
    code, out, err = cli("compare", str(tmp_path / "runs"))
    assert code == 2, (out, err)
    assert str(report) in err and "fix:" in err
    assert "Traceback" not in err
