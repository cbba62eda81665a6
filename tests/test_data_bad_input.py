"""Every kind of bad input gets a clear message with file and line, and exit code 2 from the CLI
(no traceback); with ``[data] on_error = "skip"`` the bad record is skipped, counted and listed."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import REPO, write_recipe

GOOD = {
    "id": "good",
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
}


def chat(rid: str, *msgs: tuple[str, object]) -> dict:
    return {"id": rid, "messages": [{"role": r, "content": c} for r, c in msgs]}


def lines(*records: object) -> bytes:
    return b"".join(
        (r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records
    )


def chat_file(content: bytes, name: str = "data.jsonl") -> Callable[[Path], dict]:
    def make(folder: Path) -> dict:
        (folder / name).write_bytes(content)
        return {"plugin": "chat_jsonl", "path": name}

    return make


def big_line(folder: Path) -> dict:
    with (folder / "data.jsonl").open("wb") as f:
        f.write(lines(GOOD))
        f.write(b'{"id": "huge", "messages": "' + b"x" * (17 * 2**20) + b'"}\n')
    return {"plugin": "chat_jsonl", "path": "data.jsonl"}


def report_nan(folder: Path) -> dict:
    (folder / "r.json").write_text(
        '{"id": "r", "sections": {"A": {"improved": "text"}}, "meta": {"score": Infinity}}'
    )
    return {"plugin": "report_json", "path": "r.json"}


def empty_folder(folder: Path) -> dict:
    (folder / "chats").mkdir()
    return {"plugin": "chat_jsonl", "path": "chats"}


def no_markdown(folder: Path) -> dict:
    (folder / "docs").mkdir()
    (folder / "docs" / "notes.txt").write_text("not markdown")
    return {"plugin": "markdown", "path": "docs"}


def markdown_latin1(folder: Path) -> dict:
    (folder / "docs").mkdir()
    (folder / "docs" / "a.md").write_bytes(b"# Title\n\nline two\ncaf\xe9\n")
    return {"plugin": "markdown", "path": "docs"}


def markdown_empty(folder: Path) -> dict:
    (folder / "docs").mkdir()
    (folder / "docs" / "a.md").write_text("  \n")
    return {"plugin": "markdown", "path": "docs"}


def markdown_bad_front_matter(folder: Path) -> dict:
    (folder / "docs").mkdir()
    # Line 3 of the file: an unquoted ': ' inside a value is not YAML.
    (folder / "docs" / "a.md").write_text("---\ntags: [a]\ntitle: Setup: the basics\n---\n# A\n")
    return {"plugin": "markdown", "path": "docs"}


def report_file(text: str, **options: object) -> Callable[[Path], dict]:
    """A folder holding one report ``r.json`` of ``text``; ``options``: the source's options."""

    def make(folder: Path) -> dict:
        (folder / "reports").mkdir()
        (folder / "reports" / "r.json").write_text(text)
        return {"plugin": "report_json", "path": "reports", **options}

    return make


def instruction_file(*records: object) -> Callable[[Path], dict]:
    def make(folder: Path) -> dict:
        (folder / "ins.jsonl").write_bytes(lines(*records))
        return {"plugin": "instruction_jsonl", "path": "ins.jsonl"}

    return make


CASES = {
    "malformed json": (
        chat_file(lines(GOOD, b'{"id": "x", "messages": [}')),
        "malformed JSON",
        "data.jsonl:2",
    ),
    "json array": (
        chat_file(json.dumps([GOOD, GOOD]).encode()),
        "this is a JSON array",
        "data.jsonl:1",
    ),
    "wrong type": (
        chat_file(lines(GOOD, chat("b", ("user", "q"), ("assistant", 5)))),
        "messages[1].content must be a string, got int",
        "data.jsonl:2",
    ),
    "unknown role": (
        chat_file(lines(chat("t", ("user", "q"), ("function", "r"), ("assistant", "a")), GOOD)),
        "messages[1].role is 'function'",
        "data.jsonl:1",
    ),
    "tool result without a call": (
        chat_file(lines(chat("t", ("user", "q"), ("tool", "r"), ("assistant", "a")), GOOD)),
        "messages[1]: a tool result must follow an assistant turn with tool_calls",
        "data.jsonl:1",
    ),
    "roles out of order": (
        chat_file(lines(GOOD, chat("o", ("assistant", "a"), ("user", "q")))),
        "assistant turn must follow a user turn",
        "data.jsonl:2",
    ),
    "empty assistant turn": (
        chat_file(lines(GOOD, chat("e", ("user", "q"), ("assistant", "  ")))),
        "empty assistant turn",
        "data.jsonl:2",
    ),
    "system only": (
        chat_file(lines(GOOD, chat("s", ("system", "be nice")))),
        "system-only",
        "data.jsonl:2",
    ),
    "duplicate id": (chat_file(lines(GOOD, GOOD)), "duplicate id 'good'", "data.jsonl:2"),
    "empty file": (chat_file(b""), "file holds no records", "data.jsonl"),
    "empty folder": (empty_folder, "has no files matching", "[data.sources].path"),
    "non utf-8": (
        chat_file(lines(GOOD, b'{"id": "caf\xe9", "messages": []}')),
        "not UTF-8 (byte 0xe9",
        "data.jsonl:2",
    ),
    "gzip named jsonl": (chat_file(gzip.compress(lines(GOOD))), "gzip-compressed", "data.jsonl"),
    "many-megabyte line": (big_line, "over the 16 MiB limit", "data.jsonl:2"),
    "folder without markdown": (no_markdown, "has no markdown files", "[data.sources].path"),
    "markdown not utf-8": (markdown_latin1, "not UTF-8 (byte 0xe9 at column 4)", "a.md:4"),
    "markdown empty file": (markdown_empty, "markdown file is empty", "a.md"),
    "markdown front matter not yaml": (
        markdown_bad_front_matter,
        "front matter is not valid YAML: mapping values are not allowed",
        "a.md:3",
    ),
    "report malformed json": (
        report_file('{\n  "sections": {\n    "A": {"improved": "x"},,\n  }\n}'),
        "malformed JSON",
        "r.json:3",
    ),
    "deeply nested json": (
        chat_file(
            lines(GOOD, b'{"id": "deep", "messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
        ),
        "nested too deeply",
        "data.jsonl:2",
    ),
    "5000-digit id": (
        chat_file(lines(GOOD, b'{"id": ' + b"9" * 5000 + b', "messages": []}')),
        "a number with 5000 digits",
        "data.jsonl:2",
    ),
    "lone surrogate": (
        chat_file(lines(GOOD, chat("s", ("user", "q\ud800"), ("assistant", "a")))),
        "lone surrogate",
        "data.jsonl:2",
    ),
    "NaN in meta": (
        chat_file(lines(GOOD, b'{"id": "n", "meta": {"x": NaN}}')),
        "NaN is not JSON",
        "data.jsonl:2",
    ),
    "report NaN in meta": (report_nan, "Infinity is not JSON", "r.json"),
    "duplicate id with meta.source": (
        chat_file(lines(*[{**GOOD, "meta": {"source": "wiki"}}] * 2)),
        "duplicate id 'good' (first seen at",
        "data.jsonl:1",
    ),
    "report missing field": (
        report_file(json.dumps({"sections": {"A": {"original": "x"}}})),
        "has no 'improved' field",
        "r.json",
    ),
    "instruction missing output": (
        instruction_file({"instruction": "do it"}),
        "missing field 'output'",
        "ins.jsonl:1",
    ),
    "report duplicate section": (
        report_file('{"sections": {"RESULTS": {"improved": "1"}, "RESULTS": {"improved": "2"}}}'),
        "duplicate key 'RESULTS'",
        "r.json",
    ),
    "report misspelt section": (
        report_file(
            json.dumps(
                {"sections": {"INTRODUCTION": {"improved": "i"}, "RESULTS": {"improved": "r"}}}
            ),
            sections=["INTRODUCTION", "RESULT"],
        ),
        "sections 'RESULT' are in none of the reports",
        "[data.sources].sections",
    ),
    "instruction null output": (
        instruction_file({"instruction": "do it", "output": None}),
        "output is null",
        "ins.jsonl:1",
    ),
    "instruction unknown field": (
        instruction_file({"instruction": "a", "output": "b", "extra": 1}),
        "unknown field(s) extra",
        "ins.jsonl:1",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_with_file_line_and_exit_code_2(case, tmp_path, cli):
    make, message, where = CASES[case]
    recipe = write_recipe(tmp_path, [make(tmp_path)])
    code, out, err = cli("check", str(recipe))
    assert code == 2, (out, err)
    assert message in err
    assert where in err
    assert "fix:" in err
    assert "Traceback" not in err + out


SKIPPABLE = [
    c
    for c in CASES
    if c not in ("json array", "empty folder", "folder without markdown", "empty file")
    and not c.startswith(("markdown", "report"))
]


@pytest.mark.parametrize("case", SKIPPABLE)
def test_on_error_skip_counts_and_lists_each_skip(case, tmp_path, cli):
    make, message, where = CASES[case]
    table = make(tmp_path)
    (tmp_path / "more.jsonl").write_bytes(
        lines({"instruction": "extra", "output": "ok"})
        if table["plugin"] == "instruction_jsonl"
        else lines(chat("other", ("user", "q"), ("assistant", "a")))
    )
    extra = {"plugin": table["plugin"], "path": "more.jsonl"}
    # one good record left: it must stay in train, or check stops on an empty train split
    data = {"on_error": "skip", "val_fraction": 0.0, "test_fraction": 0.0}
    recipe = write_recipe(tmp_path, [table, extra], data=data)
    code, out, err = cli("check", str(recipe))
    assert code == 0, err
    assert "skipped 1 bad records" in out
    assert message in out and where in out


def test_skipping_an_empty_file_is_reported(tmp_path, cli):
    (tmp_path / "empty.jsonl").write_bytes(b"\n\n")
    (tmp_path / "good.jsonl").write_bytes(lines(GOOD))
    sources = [{"plugin": "chat_jsonl", "path": p} for p in ("empty.jsonl", "good.jsonl")]
    code, out, _ = cli("check", str(write_recipe(tmp_path, sources, data={"on_error": "skip"})))
    assert code == 0
    assert "file holds no records" in out
    # docs/data.md's table said "(fatal)" for an empty file
    doc = (REPO / "docs" / "data.md").read_text(encoding="utf-8")
    [row] = [line for line in doc.splitlines() if line.startswith("| empty file")]
    assert 'on_error = "skip"' in row and "always fatal" in row.split("file holds no records")[1]


def test_debug_shows_the_traceback(tmp_path, cli):
    recipe = write_recipe(tmp_path, [chat_file(b"")(tmp_path)])
    from lorakit.errors import DataError

    with pytest.raises(DataError, match="file holds no records"):
        cli("--debug", "check", str(recipe))


def test_raw_text_formatter_rejects_conversations(tmp_path, data_tokenizer):
    from lorakit.contracts import Example, Message
    from lorakit.errors import DataError
    from lorakit_plugins.formatters.raw_text import RawTextFormatter, RawTextOptions

    ex = Example(id="c", messages=(Message("user", "q"), Message("assistant", "a")))
    with pytest.raises(DataError, match="raw_text cannot format conversation c"):
        RawTextFormatter(RawTextOptions()).render(ex, data_tokenizer)


def test_chatml_needs_a_single_end_of_turn_token(tmp_path):
    from lorakit.errors import DataError
    from lorakit_plugins.formatters.chatml import ChatmlFormatter, ChatmlOptions
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        ["plain text only"],
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    plain = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t")
    with pytest.raises(DataError, match=r"is \d+ tokens for this tokenizer, not one"):
        ChatmlFormatter(ChatmlOptions()).end_of_turn(plain)


def test_duplicate_ids_name_both_files_and_lines(tmp_path, cli):
    """meta.source is a user's description: the message names where each record really is."""
    record = {**GOOD, "meta": {"source": "wiki"}}
    (tmp_path / "a.jsonl").write_bytes(lines(chat("x", ("user", "q"), ("assistant", "a")), record))
    (tmp_path / "b.jsonl").write_bytes(lines(record))
    sources = [{"plugin": "chat_jsonl", "path": p} for p in ("a.jsonl", "b.jsonl")]
    code, _, err = cli("check", str(write_recipe(tmp_path, sources)))
    assert code == 2 and "duplicate id 'good'" in err
    assert "a.jsonl:2" in err and "b.jsonl:1" in err, err


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
@pytest.mark.parametrize("what", ["recipe", "chat_jsonl", "markdown"])
def test_fifos_and_devices_are_refused_not_read(special, what, tmp_path, cli):
    """A FIFO blocks and /dev/zero never ends: both are refused by name, at once."""
    import os

    path = Path(special)
    if special == "fifo":
        path = tmp_path / ("r.toml" if what == "recipe" else "d.jsonl")
        os.mkfifo(path)
    if what == "recipe":
        code, _, err = cli("check", str(path))
    else:
        code, _, err = cli(
            "check", str(write_recipe(tmp_path, [{"plugin": what, "path": str(path)}]))
        )
    assert code == 2 and "not a regular file" in err and str(path) in err
    assert "Traceback" not in err


def test_a_recipe_with_a_byte_order_mark_is_read(tmp_path, cli):
    recipe = write_recipe(tmp_path, [chat_file(lines(GOOD))(tmp_path)])
    recipe.write_bytes(b"\xef\xbb\xbf" + recipe.read_bytes())
    code, out, err = cli("check", str(recipe))
    assert code == 0, err
    assert "splits: train" in out


def test_check_show_escapes_terminal_control_sequences(tmp_path, data_tokenizer_dir, cli):
    evil = "\x1b]0;owned\x07\x1b[2J\rhidden\u202e"
    records = [chat(f"e{i}", ("user", f"hi {evil}"), ("assistant", f"yo {evil}")) for i in range(5)]
    (tmp_path / "data.jsonl").write_bytes(lines(*records))
    recipe = write_recipe(
        tmp_path,
        [{"plugin": "chat_jsonl", "path": "data.jsonl"}],
        format={"plugin": "chatml"},
        data={"val_fraction": 0.0, "test_fraction": 0.0},
    )
    code, out, err = cli(
        "check", str(recipe), "--show", "2", "--tokenizer", str(data_tokenizer_dir)
    )
    assert code == 0, err
    assert "\x1b" not in out and "\r" not in out and "\u202e" not in out
    assert "\\x1b]0;owned\\x07" in out and "\\r" in out and "\\u202e" in out


def test_split_files_hold_strict_json_only(tmp_path):
    """A source that yields NaN or a lone surrogate gets a clear error, not a broken file."""
    from lorakit.contracts import Example
    from lorakit.data.pipeline import Splits, write_splits
    from lorakit.errors import DataError

    for bad in ({"score": float("nan")}, {"note": "\ud800"}):
        ex = Example(id="x", text="t", meta={"source": "s.jsonl:3", **bad})
        with pytest.raises(DataError, match="cannot be saved as JSON") as info:
            write_splits(tmp_path / "splits", Splits(train=[ex], val=[], test=[]))
        assert "s.jsonl:3" in str(info.value)
        assert not any((tmp_path / "splits").iterdir()), "nothing half-written is left"


def test_a_data_file_with_a_byte_order_mark_is_read(tmp_path, cli):
    """Editors that write a BOM in recipes write one in data files too; both are read."""
    recipe = write_recipe(tmp_path, [chat_file(b"\xef\xbb\xbf" + lines(GOOD))(tmp_path)])
    code, out, err = cli("check", str(recipe))
    assert code == 0, err
    assert "splits: train" in out
