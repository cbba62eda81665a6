"""Preference tuning without a model: the [train] objective options, the pair contract, the
``preference_jsonl`` source (TRL and HH shapes, every bad pair named by file:line), tokenized
pairs and ``lorakit check``'s pair statistics (issue 23)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import preference_records, tiny_recipe, with_preference_source, write_jsonl
from lorakit.api import Example, Message, example_problem, read_source
from lorakit.errors import DataError, RecipeError
from lorakit.recipe import load_recipe
from lorakit_plugins.sources.preference_jsonl import PreferenceJsonlSource

GOOD = """
[[data.sources]]
plugin = "chat_jsonl"
path = "chat.jsonl"
[train]
"""


def recipe(tmp_path: Path, train: str = "", *overrides: str):
    path = tmp_path / "r.toml"
    path.write_text(GOOD + train, encoding="utf-8")
    return load_recipe(path, overrides)


def problems(tmp_path: Path, train: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe(tmp_path, train)
    return info.value.problems


# --------------------------------------------------------------------------- recipe


def test_an_sft_recipe_records_no_preference_key(tmp_path):
    train = recipe(tmp_path).resolved()["train"]
    assert train["max_steps"] == -1
    for key in ("objective", "beta", "loss_type", "label_smoothing", "simpo_gamma", "orpo_lambda"):
        assert key not in train, key
    assert "from_adapter" not in train
    assert "from_adapter" in recipe(tmp_path, 'from_adapter = "runs/sft"').resolved()["train"]


def test_each_objective_gets_its_defaults(tmp_path):
    dpo = recipe(tmp_path, 'objective = "dpo"').train
    assert (dpo.beta, dpo.loss_type, dpo.label_smoothing) == (0.1, "sigmoid", 0.0)
    assert recipe(tmp_path, 'objective = "simpo"').train.beta == 2.0
    assert recipe(tmp_path, 'objective = "orpo"').train.orpo_lambda == 0.1
    resolved = recipe(tmp_path, 'objective = "dpo"\nbeta = 0.3').resolved()["train"]
    assert resolved["objective"] == "dpo" and resolved["beta"] == 0.3


def test_bad_objective_options_name_their_key(tmp_path):
    found = problems(tmp_path, 'objective = "ppo"')
    assert found[0].startswith("[train].objective:") and "dpo" in found[0]
    found = problems(tmp_path, 'objective = "dpo"\nloss_type = "exo"')
    assert found[0].startswith("[train].loss_type:")
    found = problems(tmp_path, 'objective = "dpo"\nlabel_smoothing = 0.5')
    assert found[0].startswith("[train].label_smoothing:")
    found = problems(tmp_path, 'objective = "dpo"\nbeta = -1.0')
    assert "train.beta must be a number above 0" in found[0]
    found = problems(tmp_path, 'objective = "dpo"\nsimpo_gamma = 1.0')
    assert "train.simpo_gamma = 1.0 is not used by objective = 'dpo'" in found[0]
    found = problems(tmp_path, 'loss_type = "ipo"')
    assert "train.loss_type = 'ipo' is not used by objective = 'sft'" in found[0]
    # conservative DPO smooths the sigmoid loss only: IPO and hinge would train without it
    for loss in ("ipo", "hinge"):
        found = problems(
            tmp_path, f'objective = "dpo"\nloss_type = "{loss}"\nlabel_smoothing = 0.1'
        )
        assert f"train.label_smoothing = 0.1 is not used by loss_type = '{loss}'" in found[0]
    assert recipe(tmp_path, 'objective = "dpo"\nlabel_smoothing = 0.1').train.label_smoothing == 0.1


# --------------------------------------------------------------------------- contract


def _pair(**kw) -> Example:
    base = {
        "id": "a",
        "messages": (Message("user", "q"), Message("assistant", "good")),
        "rejected": (Message("assistant", "bad"),),
    }
    return Example(**{**base, **kw})


def test_the_pair_contract():
    assert example_problem(_pair()) is None
    assert "identical" in example_problem(_pair(rejected=(Message("assistant", "good"),)))
    assert "both hold text" in example_problem(_pair(rejected=(Message("assistant", " "),)))
    assert "assistant Message" in example_problem(_pair(rejected=(Message("user", "x"),)))
    assert "tuple of one" in example_problem(_pair(rejected=()))
    text = Example(id="t", text="x", rejected=(Message("assistant", "y"),))
    assert "text example" in example_problem(text)


def test_a_pair_round_trips_through_a_split_file():
    from lorakit.data.splits import content_key
    from lorakit.data.spool import example_from_json

    ex = _pair()
    back = example_from_json(json.loads(json.dumps(ex.to_json())))
    assert back == ex
    assert back.rejected_messages == (Message("user", "q"), Message("assistant", "bad"))
    sft = Example(id="a", messages=ex.messages)
    assert "rejected" not in sft.to_json()
    assert content_key(sft) != content_key(ex), "another rejected side is another pair"


# --------------------------------------------------------------------------- the source


def read(tmp_path: Path, records: list, on_error: str = "fail"):
    write_jsonl(tmp_path / "p.jsonl", records)
    return read_source(
        PreferenceJsonlSource, {"path": "p.jsonl"}, recipe_dir=tmp_path, on_error=on_error
    )


def test_trl_strings_and_messages_and_hh_conversations_give_the_same_pair(tmp_path):
    conv_c = [{"role": "user", "content": "hi?"}, {"role": "assistant", "content": "yes"}]
    conv_r = [{"role": "user", "content": "hi?"}, {"role": "assistant", "content": "no"}]
    records = [
        {"prompt": "hi?", "chosen": "yes", "rejected": "no"},
        {
            "prompt": [{"role": "user", "content": "hi?"}],
            "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        },
        {"chosen": conv_c, "rejected": conv_r},
        {
            "chosen": "\n\nHuman: hi?\n\nAssistant: yes",
            "rejected": "\n\nHuman: hi?\n\nAssistant: no",
        },
    ]
    examples = []
    for i, rec in enumerate(records):
        (ex,), _ = read(tmp_path / str(i), [rec])
        examples.append(ex)
    assert {(ex.messages, ex.rejected) for ex in examples} == {
        (
            (Message("user", "hi?"), Message("assistant", "yes")),
            (Message("assistant", "no"),),
        )
    }
    assert len({ex.id for ex in examples}) == 1, "ids hash the content, whatever the shape"
    assert examples[0].id.startswith("pair-")


def test_multi_turn_hh_prompts_keep_earlier_turns(tmp_path):
    c = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good"
    r = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad"
    (ex,), _ = read(tmp_path, [{"id": 7, "chosen": c, "rejected": r}])
    assert ex.id == "7" and [m.role for m in ex.messages] == ["user", "assistant"] * 2
    assert ex.prompt[-1] == Message("user", "c")


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
        ({"prompt": "q", "chosen": "", "rejected": "x"}, "chosen answer is empty"),
        ({"prompt": "q", "chosen": "x", "rejected": "  "}, "rejected answer is empty"),
        ({"prompt": "q", "chosen": "x"}, "no 'rejected' field"),
        ({"prompt": " ", "chosen": "x", "rejected": "y"}, "the prompt is empty"),
        (
            {"prompt": [{"role": "user", "content": ""}], "chosen": "x", "rejected": "y"},
            "the prompt is empty",
        ),
        ({"prompt": "q", "chosen": {"a": 1}, "rejected": "y"}, '"role": "assistant"'),
        ({"prompt": "q", "chosen": "x", "rejected": "y", "score": 1}, "unknown field(s) score"),
        (
            {
                "chosen": "\n\nHuman: q1\n\nAssistant: x",
                "rejected": "\n\nHuman: q2\n\nAssistant: y",
            },
            "differ before their last turn",
        ),
        (
            {"chosen": [{"role": "user", "content": "q"}], "rejected": "\n\nHuman: q"},
            "must end with an assistant turn",
        ),
        ({"chosen": "plain text", "rejected": "other"}, "not an HH conversation"),
        ({"prompt": "q", "chosen": ["a", "b"], "rejected": "y"}, "must be a {role, content}"),
        (  # a tool turn needs the tool call before it, which a pair cannot hold
            {"prompt": [{"role": "tool", "content": "r"}], "chosen": "x", "rejected": "y"},
            "has role 'tool'",
        ),
    ],
)
def test_bad_pairs_are_named_by_file_and_line(tmp_path, record, reason):
    good = {"prompt": "q", "chosen": "x", "rejected": "y"}
    with pytest.raises(DataError) as info:
        read(tmp_path, [good, record])
    assert reason in str(info.value) and "p.jsonl:2" in str(info.value)
    examples, skipped = read(tmp_path, [good, record], on_error="skip")
    assert len(examples) == 1 and len(skipped) == 1 and skipped[0][0].endswith("p.jsonl:2")


def test_duplicate_pairs_are_reported_with_both_places(tmp_path, monkeypatch):
    from lorakit.data.pipeline import load_splits
    from lorakit.session import open_session

    with_preference_source(monkeypatch)
    pairs = preference_records(5)
    write_jsonl(tmp_path / "p.jsonl", [*pairs, pairs[2]])
    path = tmp_path / "r.toml"
    path.write_text('[[data.sources]]\nplugin = "preference_jsonl"\npath = "p.jsonl"\n')
    session = open_session(path, ())
    with pytest.raises(DataError) as info:
        load_splits(session.components.sources, session.recipe.data, tmp_path)
    assert "duplicate id 'p2'" in str(info.value) and "p.jsonl:3" in str(info.value)


# --------------------------------------------------------------------------- tokenized pairs


def test_only_the_final_answers_are_supervised_and_long_pairs_are_dropped_and_counted(
    data_tokenizer,
):
    from lorakit.catalog import default_catalog
    from lorakit.data.pairs import tokenize_pairs
    from lorakit.data.report import DataReport

    formatter = (
        default_catalog()
        .get("formatter", "chatml")
        .factory(default_catalog().get("formatter", "chatml").options_class())
    )
    prompt = (Message("user", "q1"), Message("assistant", "earlier answer"), Message("user", "q2"))
    short = Example(
        id="s",
        messages=(*prompt, Message("assistant", "Bonjour")),
        rejected=(Message("assistant", "Tokyo"),),
    )
    long = Example(
        id="l",
        messages=(*prompt, Message("assistant", "hello " * 80)),
        rejected=(Message("assistant", "x"),),
    )
    report = DataReport()
    rows = tokenize_pairs([short, long], formatter, data_tokenizer, 64, "drop", report)
    assert len(rows) == 1 and report.dropped == {"pair longer than train.max_length=64": 1}
    for row, answer in ((rows[0].chosen, "Bonjour"), (rows[0].rejected, "Tokyo")):
        supervised = [t for t in row.labels if t != -100]
        text = data_tokenizer.decode(supervised)
        assert text.startswith(answer) and "earlier" not in text, text
    with pytest.raises(DataError, match=r"over train\.max_length=64"):
        tokenize_pairs([long], formatter, data_tokenizer, 64, "error", DataReport())
    sft = Example(id="x", messages=short.messages)
    with pytest.raises(DataError, match="not a preference pair"):
        tokenize_pairs([sft], formatter, data_tokenizer, 64, "drop", DataReport())


def test_check_reports_pair_counts_and_lengths(tmp_path, tiny_model_dir, cli, monkeypatch):
    with_preference_source(monkeypatch)
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_records(30))
    path = tiny_recipe(tmp_path, tiny_model_dir, data)
    text = path.read_text().replace('"chat_jsonl"', '"preference_jsonl"')
    path.write_text(text)
    code, out, err = cli("check", path, 'train.objective="dpo"')
    assert code == 0, err
    assert "train: " in out and " pairs; tokens per pair (both sides) mean" in out, out
    assert "chosen answers mean" in out and "rejected answers mean" in out
