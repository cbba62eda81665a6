"""``lorakit check``: token statistics without torch, --show markers, the shipped recipes,
and the torch-free tokenizer agreeing with transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, write_jsonl, write_recipe
from lorakit.contracts import Example, Message
from lorakit.data.lite_tokenizer import LiteTokenizer
from lorakit.data.tokenize import tokenize_batch
from lorakit_plugins.formatters.chat_template import ChatTemplateFormatter, ChatTemplateOptions

OURS = ["markdown_lora", "report_json_lora", "instruction_lora", "mixed_sources"]


def chat_recipe(tmp_path: Path, **sections) -> Path:
    recs = [
        {
            "id": f"c{i}",
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i}"},
            ],
        }
        for i in range(20)
    ]
    write_jsonl(tmp_path / "c.jsonl", recs)
    return write_recipe(tmp_path, [{"plugin": "chat_jsonl", "path": "c.jsonl"}], **sections)


def test_check_reports_token_stats_without_importing_torch(tmp_path, data_tokenizer_dir):
    recipe = chat_recipe(tmp_path, format={"plugin": "chatml"}, train={"max_length": 16})
    code = (
        "import sys; from lorakit.cli.main import main; "
        f"rc = main(['check', {str(recipe)!r}, '--tokenizer', {str(data_tokenizer_dir)!r}]); "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'transformers' not in sys.modules, 'transformers imported'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    # every example is over 16 tokens: the statistics say why, then check stops as run would
    assert proc.returncode == 2, proc.stderr
    assert "no training example is left" in proc.stderr and "Traceback" not in proc.stderr
    out = proc.stdout
    assert "source 0:chat_jsonl: 20 examples" in out
    assert "tokens per example: min" in out and "p95" in out
    assert "longer than 16 tokens: dropped" in out
    assert "supervised tokens:" in out
    assert "end-of-turn '<|im_end|>' supervised" in out


def test_check_show_marks_supervised_text(tmp_path, data_tokenizer_dir, cli):
    recipe = chat_recipe(tmp_path, format={"plugin": "chatml"})
    code, out, err = cli(
        "check", str(recipe), "--tokenizer", str(data_tokenizer_dir), "--show", "2"
    )
    assert code == 0, err
    assert out.count("[[answer ") == 2 and "<|im_end|>]]" in out
    assert "[[question" not in out


def test_check_reports_examples_without_supervised_tokens(tmp_path, data_tokenizer_dir, cli):
    write_jsonl(tmp_path / "t.jsonl", [{"instruction": "x", "output": "y"}])
    recipe = write_recipe(
        tmp_path,
        [{"plugin": "instruction_jsonl", "path": "t.jsonl"}],
        train={"max_length": 9},
        data={"overlength": "truncate"},
    )
    code, out, err = cli("check", str(recipe), "--tokenizer", str(data_tokenizer_dir))
    assert code == 2 and "Traceback" not in err, err  # the one example is dropped: nothing to train
    assert "answer entirely beyond train.max_length=9" in out


def test_check_without_tokenizer_says_why(tmp_path, monkeypatch, cli):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "nocache"))
    code, out, _ = cli("check", str(chat_recipe(tmp_path)))
    assert code == 0
    assert "token statistics skipped: the embedded model is converted on first use" in out


@pytest.mark.parametrize("name", OURS)
def test_shipped_recipes_check(name, data_tokenizer_dir, cli):
    code, out, err = cli(
        "check", str(REPO / "recipes" / f"{name}.toml"), "--tokenizer", str(data_tokenizer_dir)
    )
    assert code == 0, err
    assert "supervised tokens:" in out


def test_lite_tokenizer_matches_transformers(data_tokenizer, data_tokenizer_dir):
    lite = LiteTokenizer(data_tokenizer_dir)
    texts = ["<s>hello world</s>", "# Heading\n\nx<|im_end|>\n", "ünïcode  spaces\t"]
    for kw in ({"add_special_tokens": False}, {"add_special_tokens": True}):
        a = data_tokenizer(texts, return_offsets_mapping=True, **kw)
        b = lite(texts, return_offsets_mapping=True, **kw)
        assert a["input_ids"] == b["input_ids"]
        assert [list(map(tuple, o)) for o in a["offset_mapping"]] == b["offset_mapping"]
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    for gen in (False, True):
        assert lite.apply_chat_template(conv, add_generation_prompt=gen) == (
            data_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        )
    ex = Example(id="e", messages=(Message("user", "u"), Message("assistant", "a")))
    fmt = ChatTemplateFormatter(ChatTemplateOptions())
    rows = [tokenize_batch([fmt.render(ex, t)], t)[0] for t in (data_tokenizer, lite)]
    assert rows[0] == rows[1]


def one_val_example(tmp_path: Path) -> Path:
    write_jsonl(
        tmp_path / "one.jsonl",
        [{"id": "only", "meta": {"split": "val"},
          "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
    )  # fmt: skip
    return write_recipe(tmp_path, [{"plugin": "chat_jsonl", "path": "one.jsonl"}])


def test_check_refuses_an_empty_train_split(tmp_path, data_tokenizer_dir, cli):
    code, _, err = cli("check", one_val_example(tmp_path), "--tokenizer", data_tokenizer_dir)
    assert code == 2 and "Traceback" not in err, err
    assert "train split is empty" in err and "val_fraction" in err, err


@pytest.mark.slow  # run_recipe itself (it stops at the data, before the model loads)
def test_run_refuses_an_empty_train_split_before_writing(tmp_path, cli):
    code, _, err = cli("run", one_val_example(tmp_path))
    assert code == 2 and "Traceback" not in err, err
    assert "train split is empty" in err and "val_fraction" in err, err
    assert not (tmp_path / "runs").exists(), "run wrote nothing"


def test_check_says_when_no_training_example_is_left(tmp_path, data_tokenizer_dir, cli):
    recipe = chat_recipe(tmp_path, format={"plugin": "chatml"}, train={"max_length": 8})
    code, out, err = cli("check", recipe, "--tokenizer", data_tokenizer_dir, "--show", "1")
    assert code == 2 and "Traceback" not in err, err
    assert "longer than 8 tokens: dropped" in out
    assert "no training example is left" in err and "lorakit run` would stop" in err, err
    assert "max_length" in err


def test_check_fails_where_an_overlength_error_would_stop_the_run(
    tmp_path, data_tokenizer_dir, cli
):
    # a CI gate on `lorakit check` passed (exit 0) where `lorakit run` then stopped
    recipe = chat_recipe(
        tmp_path, format={"plugin": "chatml"}, train={"max_length": 8}, data={"overlength": "error"}
    )
    code, out, err = cli("check", recipe, "--tokenizer", data_tokenizer_dir)
    assert code == 2 and "Traceback" not in err, err
    assert "an error: `lorakit run` would stop" in out
    assert "20 examples are longer than train.max_length=8" in err and "overlength" in err, err


# --------------------------------------------------------------------------- special-token text


def test_a_message_that_spells_a_special_token_is_refused(tmp_path, data_tokenizer_dir, cli):
    """``<|im_end|>`` written inside a reply would be tokenized as the end-of-turn token:
    the model would learn to end its turn mid-message. check and run refuse it by name."""
    recs = [
        {
            "id": f"c{i}",
            "messages": [
                {"role": "user", "content": "What ends a turn?"},
                {"role": "assistant", "content": f"answer {i}"},
            ],
        }
        for i in range(4)
    ]
    recs[2]["messages"][1]["content"] = "The token <|im_end|> does."
    write_jsonl(tmp_path / "c.jsonl", recs)
    recipe = write_recipe(tmp_path, [{"plugin": "chat_jsonl", "path": "c.jsonl"}])
    code, _, err = cli("check", str(recipe), "--tokenizer", str(data_tokenizer_dir))
    assert code == 2 and "Traceback" not in err, err
    assert "c.jsonl:3" in err and "message 2 (assistant)" in err and "'<|im_end|>'" in err
    assert "remove or reword" in err


def test_raw_text_that_spells_special_tokens_is_reported(tmp_path, data_tokenizer_dir, cli):
    """A raw text may be written in a chat format on purpose, so it trains, with a warning
    that names the tokens and the examples."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("Turns end with <|im_end|> in ChatML.\n", encoding="utf-8")
    (docs / "b.md").write_text("Plain prose about nothing special.\n", encoding="utf-8")
    recipe = write_recipe(tmp_path, [{"plugin": "markdown", "path": "docs"}])
    code, out, err = cli("check", str(recipe), "--tokenizer", str(data_tokenizer_dir))
    assert code == 0, err
    (line,) = [x for x in out.splitlines() if "special tokens" in x]
    assert "1 raw-text example spells" in line and "'<|im_end|>' in 1" in line
    assert "a.md" in line and "b.md" not in line


def test_special_text_check_reads_the_tokenizer_special_tokens(data_tokenizer, data_tokenizer_dir):
    """The transformers tokenizer and check's torch-free one name the same special tokens,
    and ordinary text (including near misses) passes."""
    from lorakit.data.report import DataReport
    from lorakit.data.special_text import check_special_text, special_strings

    assert "<|im_end|>" in special_strings(data_tokenizer)
    assert special_strings(LiteTokenizer(data_tokenizer_dir)) == special_strings(data_tokenizer)
    report = DataReport()
    near = [Message("user", "<| im_end |> and <im_end> are text"), Message("assistant", "ok")]
    check_special_text([Example(id="n", messages=tuple(near))], data_tokenizer, report)
    check_special_text([Example(id="t", text="no tokens here")], data_tokenizer, report)
    assert not report.special_text


def test_check_with_a_tokenizer_folder_without_tokenizer_json(tmp_path, cli):
    recipe = chat_recipe(tmp_path)
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        code, _, err = cli("check", str(recipe), "--tokenizer", str(folder))
        assert code == 2 and "Traceback" not in err, err
        assert "holds no tokenizer.json" in err


def test_check_says_which_split_drops_come_from_and_counts_the_trained_rows(
    tmp_path, data_tokenizer_dir, cli
):
    # the drops of val examples read as training drops, and their tokens were in the share
    def chat(i: int, answer: str, split: str) -> dict:
        msgs = [
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": answer},
        ]
        return {"id": f"c{i}", "messages": msgs, "meta": {"split": split}}

    train = [chat(i, f"answer {i}", "train") for i in range(4)]
    long = [chat(i, "answer " * 200, "val") for i in (4, 5)]
    write_jsonl(tmp_path / "c.jsonl", train + long)
    source = {"plugin": "chat_jsonl", "path": "c.jsonl"}
    sections = {"format": {"plugin": "chatml"}, "train": {"max_length": 64}}
    recipe = write_recipe(tmp_path, [source], **sections)
    code, out, err = cli("check", str(recipe), "--tokenizer", str(data_tokenizer_dir))
    assert code == 0, err
    assert '2 examples longer than 64 tokens: dropped ([data] overlength = "drop"; val 2)' in out
    assert "would drop 2 examples: longer than train.max_length=64 (val split)" in out
    [share] = [line for line in out.splitlines() if "supervised tokens:" in line]
    assert "in the 4 training rows as trained" in share
    write_jsonl(tmp_path / "c.jsonl", train)  # the val examples' tokens were never counted
    code, out, err = cli("check", str(recipe), "--tokenizer", str(data_tokenizer_dir))
    assert code == 0 and share in out.splitlines(), out


@pytest.mark.slow  # lorakit run, stopped before training
def test_run_refuses_special_token_text_in_a_scored_split_before_training(
    tmp_path, tiny_model_dir, cli
):
    """A test-split conversation that spells ``<|im_end|>`` is refused before training, not
    after it (the test split is tokenized only for the final evaluation), and nothing is
    written; an evaluation that meets one (a run made before the check) leaves it unscored."""
    from helpers import chat_records, tiny_recipe
    from lorakit.contracts import ModelRef
    from lorakit.evaluation.sets import prepare_set
    from lorakit.modeling import load_tokenizer
    from lorakit_plugins.formatters.chatml import ChatmlFormatter, ChatmlOptions

    recs = chat_records(12)
    recs[5]["meta"] = {"split": "test"}
    recs[5]["messages"][1]["content"] = 'Done.<|im_end|> {"item": "cup"}'
    write_jsonl(tmp_path / "chat.jsonl", recs)
    recipe = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        tmp_path / "chat.jsonl",
        extra='[eval]\nsplits = ["val", "test"]\n',
    )
    code, _, err = cli("run", str(recipe), "train.max_steps=1")
    assert code == 2 and "Traceback" not in err, err
    assert "chat.jsonl:6" in err and "'<|im_end|>'" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())

    ex = [
        Example(id="ok", messages=(Message("user", "hi"), Message("assistant", "yo"))),
        Example(id="bad", messages=(Message("user", "hi"), Message("assistant", "a<|im_end|>"))),
    ]
    tok = load_tokenizer(ModelRef(path=str(tiny_model_dir), label="tiny"))
    got = prepare_set(
        "test",
        ex,
        ChatmlFormatter(ChatmlOptions()),
        tok,
        max_length=64,
        overlength="drop",
        max_examples=None,
        generation=True,
    )
    assert got.ids == ["ok"]
    assert got.skipped == {"a message spells the special token '<|im_end|>' (not scored)": 1}
