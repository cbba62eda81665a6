"""Files that are not what a verb expects get a message naming the file, not a wrong one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.mark.parametrize("kind", ["device", "fifo", "directory", "missing", "latin-1"])
def test_generate_file_that_is_not_a_text_file_says_what_it_is(kind, tmp_path):
    from lorakit.errors import DataError
    from lorakit.generation import read_prompts

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
    ("name", "content", "expected"),
    [
        # a byte-order mark (Notepad): it went into the first prompt, or was refused as
        # "Unexpected UTF-8 BOM" with no fix
        ("p.txt", b"\xef\xbb\xbfhello\r\nworld\n", ["hello", "world"]),
        ("p.jsonl", b'\xef\xbb\xbf{"messages": [{"role": "user", "content": "hi"}]}\n', ["hi"]),
        # U+2028 is valid inside a JSON string; splitlines() cut the line there
        ("p.jsonl", '{"prompt": "a\u2028b\u2029c\x85d"}\n'.encode(), ["a\u2028b\u2029c\x85d"]),
        ("p.txt", "a\u2028b\n".encode(), ["a\u2028b"]),
    ],
)
def test_generate_file_reads_byte_order_marks_and_unicode_separators(
    name, content, expected, tmp_path
):
    from lorakit.generation import read_prompts

    path = tmp_path / name
    path.write_bytes(content)
    prompts = read_prompts([], path)
    assert [p.messages[-1].content for p in prompts] == expected


def test_generate_file_not_utf_8_after_a_byte_order_mark_names_the_byte(tmp_path):
    from lorakit.errors import DataError
    from lorakit.generation import read_prompts

    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbfab\xff\n")
    with pytest.raises(DataError, match="not UTF-8 \\(byte 5\\)"):
        read_prompts([], path)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        '{"results": 3}',
        '{"results": [1]}',
        '{"results": [{"metrics": []}]}',
        # hand-edited values: a metric that is not a number, kinds that are not an object
        '{"results": [{"split": "val", "adapter": "a", "metrics": {"json_match": "abc"}}]}',
        '{"results": [{"split": "val", "metrics": {"eval_loss": [1]}}]}',
        '{"results": [{"split": "val", "metrics": {"eval_loss": true}}]}',
        '{"results": [], "metric_kinds": []}',
        # the fields a row is named and told apart by: a TypeError traceback in compare
        '{"run": "a", "results": [{"model": 5, "adapter": null, "split": "val", "metrics": {}}]}',
        '{"results": [{"model": "m", "adapter": ["x"], "split": "val", "metrics": {"m": 1}}]}',
        '{"results": [{"model": "m", "split": 3, "metrics": {"m": 1.0}}]}',
        '{"results": [{"model": "m", "split": "val", "role": {}, "metrics": {}}]}',
        '{"run": 7, "results": [{"model": "m", "split": "val", "metrics": {}}]}',
        '{"baseline_key": [1], "results": [{"model": "m", "split": "val", "metrics": {}}]}',
    ],
)
def test_compare_names_a_malformed_eval_report(content, tmp_path, cli):
    report = tmp_path / "runs" / "r1" / "eval_report.json"
    report.parent.mkdir(parents=True)
    report.write_text(content)
    code, out, err = cli("compare", str(tmp_path / "runs"))
    assert code == 2, (out, err)
    assert str(report) in err and "fix:" in err
    assert "Traceback" not in err


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [*{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}]\n"
    for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)


def test_a_yaml_alias_bomb_in_markdown_front_matter_is_refused(tmp_path):
    front, message = BOMB, "front matter: a YAML alias"
    import subprocess
    import sys

    from helpers import write_recipe

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(f"---\n{front}---\n# A\n\nSome text.\n")
    recipe = write_recipe(tmp_path, [{"plugin": "markdown", "path": "docs"}])
    main = "import sys; from lorakit.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", main, "check", str(recipe)],
        capture_output=True,
        text=True,
        timeout=120,  # the 400-byte alias bomb expanded for minutes, then ran out of memory
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "a.md" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "content, message",
    [
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 32 levels deep"),
        (BOMB, "a YAML alias"),
        (
            "distributed_type: MULTI_GPU\nnum_processes: 2\nnum_processes: 8\n",
            "accelerate.yaml:3: num_processes: given twice",
        ),
    ],
    ids=["nested 5000 deep", "alias bomb", "a key twice"],
)
def test_a_hostile_launch_config_is_refused(content, message, tmp_path):
    import subprocess
    import sys

    from helpers import write_recipe

    (tmp_path / "data.jsonl").write_text(
        '{"id": "a", "messages": [{"role": "user", "content": "hi"},'
        ' {"role": "assistant", "content": "yo"}]}\n'
    )
    recipe = write_recipe(tmp_path, [{"plugin": "chat_jsonl", "path": "data.jsonl"}])
    config = tmp_path / "accelerate.yaml"
    config.write_text(content)
    main = "import sys; from lorakit.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", main, "check", str(recipe), "--launch-config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "accelerate.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "front",
    ["split: test\ntags: [a]\nsplit: train\n", "meta:\n  lang: en\n  lang: de\n"],
    ids=["top level", "nested"],
)
def test_a_key_given_twice_in_front_matter_is_refused(front, tmp_path, cli):
    """YAML keeps a repeated key's last value: ``split: test`` then ``split: train`` would
    have put a document pinned to test into train without a word."""
    from helpers import write_recipe

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(f"---\n{front}---\nBody text here.\n")
    (tmp_path / "docs" / "b.md").write_text("---\nsplit: train\ntags: [a, a]\n---\nOther.\n")
    recipe = write_recipe(tmp_path, [{"plugin": "markdown", "path": "docs"}])
    code, _, err = cli("check", str(recipe))
    assert code == 2 and "Traceback" not in err, err
    assert "a.md" in err and "given twice" in err and "b.md" not in err


def test_a_key_given_twice_in_a_tools_file_is_refused(tmp_path, cli):
    """``"required": ["city"]`` then ``"required": []``: a plain JSON reader kept the empty
    list, and tool calls without the required argument passed the check."""
    from helpers import write_jsonl, write_recipe

    (tmp_path / "tools.json").write_text(
        '[{"type": "function", "function": {"name": "get_weather", "description": "W", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, '
        '"required": ["city"], "required": []}}}]'
    )
    write_jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "id": "a",
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ],
            }
        ],
    )
    recipe = write_recipe(
        tmp_path, [{"plugin": "chat_jsonl", "path": "d.jsonl", "tools": "tools.json"}]
    )
    code, _, err = cli("check", str(recipe))
    assert code == 2 and "Traceback" not in err, err
    assert "tools.json" in err and "duplicate key 'required'" in err
