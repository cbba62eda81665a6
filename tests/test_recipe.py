"""Recipe validation: every problem at once, with key paths and fixes."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import REPO
from lorakit.catalog import default_catalog
from lorakit.errors import RecipeError
from lorakit.recipe import load_recipe
from lorakit.recipe_toml import parse_override

GOOD = """
[quant]
plugin = "bnb-4bit"
[peft]
r = 8
[[data.sources]]
plugin = "chat_jsonl"
path = "chat.jsonl"
"""


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def problems(tmp_path: Path, text: str, *overrides: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text), overrides)
    return info.value.problems


def test_defaults_fill_in(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert r.model.name == "smollm2-135m-instruct"
    assert r.format.name == "chat_template"
    assert r.quant.options.quant_type == "nf4" and r.quant.options.double_quant
    assert r.peft.options.r == 8 and r.peft.options.target_modules == "all-linear"
    assert r.name == "r" and r.run_dir == Path("runs") / "r"
    assert r.sources[0].options.path == "chat.jsonl"


def test_a_run_named_after_its_recipe_file_stays_under_output_dir(tmp_path):
    """A file named "...toml" has the stem "..": its run folder was output.dir's parent, and
    prepare wrote data/splits/ there."""
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, GOOD, "...toml"))
    assert "[output].name: unset" in str(info.value) and "no '..'" in str(info.value)
    assert load_recipe(write(tmp_path, GOOD, "...toml"), ["output.name=ok"]).name == "ok"
    assert load_recipe(write(tmp_path, GOOD, "my recipe (v2).toml")).name == "my recipe (v2)"


def test_all_problems_reported_at_once(tmp_path):
    text = GOOD.replace("r = 8", 'r = "8"') + "\n[train]\nlerning_rate = 1e-4\n"
    text = text.replace('plugin = "bnb-4bit"', 'plugin = "bnb-4bti"')
    found = problems(tmp_path, text)
    assert len(found) == 3
    assert any(p.startswith('[peft].r: expected an integer, got "8"') for p in found)
    assert any("[train].lerning_rate: unknown key, did you mean learning_rate?" in p for p in found)
    assert any(
        '[quant].plugin: unknown quant plugin "bnb-4bti"' in p and "bnb-4bit" in p for p in found
    )


def test_unknown_section_and_source_plugin(tmp_path):
    text = (
        GOOD.replace('plugin = "chat_jsonl"', 'plugin = "chat_jsonll"') + "\n[traning]\nseed = 1\n"
    )
    found = problems(tmp_path, text)
    assert any("[traning]: unknown section, did you mean [train]?" in p for p in found)
    assert any(p.startswith("[data.sources.0].plugin: unknown source plugin") for p in found)


def test_validators_and_literals(tmp_path):
    text = GOOD + '\n[train]\nper_device_train_batch_size = 0\nlr_scheduler_type = "cosinus"\n'
    text = text.replace('plugin = "bnb-4bit"', 'plugin = "bnb-4bit"\nquant_type = "nf5"')
    found = problems(tmp_path, text)
    assert any(p.startswith("[train].per_device_train_batch_size:") for p in found)
    assert any(p.startswith('[train].lr_scheduler_type: expected one of "linear"') for p in found)
    assert any(
        p.startswith('[quant].quant_type: expected one of "nf4", "fp4", got "nf5"') for p in found
    )


def test_cross_field_rules(tmp_path):
    found = problems(tmp_path, GOOD + "\n[data]\nval_fraction = 0.6\ntest_fraction = 0.5\n")
    assert any("val_fraction + test_fraction" in p for p in found)


def test_missing_data_and_required_plugin_option(tmp_path):
    found = problems(tmp_path, '[model]\nplugin = "local"\n')
    assert any(p.startswith("[model].path: required key is missing") for p in found)
    assert any(p.startswith("[data]: missing") for p in found)


def test_secrets_are_refused(tmp_path):
    found = problems(
        tmp_path, GOOD.replace('plugin = "bnb-4bit"', 'plugin = "bnb-4bit"\ntoken = "hf_x"')
    )
    assert any("secrets never go in recipes" in p and "HF_TOKEN" in p for p in found)


def test_toml_syntax_error_names_line(tmp_path):
    found = problems(tmp_path, "[train]\nseed = = 3\n")
    assert len(found) == 1 and "r.toml:2:8: invalid TOML: Invalid value" in found[0]


def test_overrides(tmp_path):
    r = load_recipe(
        write(tmp_path, GOOD),
        [
            "train.max_steps=5",
            "peft.r=4",
            "output.name=x",
            "data.sources.0.path=other.jsonl",
            'peft.target_modules=["q_proj"]',
        ],
    )
    assert r.train.max_steps == 5 and r.peft.options.r == 4 and r.name == "x"
    assert r.sources[0].options.path == "other.jsonl"
    assert r.peft.options.target_modules == ("q_proj",)
    found = problems(tmp_path, GOOD, "train.max_stepz=5")
    assert any("[train].max_stepz: unknown key, did you mean max_steps?" in p for p in found)
    assert any("expected KEY.PATH=VALUE" in p for p in problems(tmp_path, GOOD, "nonsense"))


@pytest.mark.parametrize(
    ("item", "keys", "value"),
    [
        ("train.seed=3", ["train", "seed"], 3),
        ("output.name=abc", ["output", "name"], "abc"),
        ("train.packing=true", ["train", "packing"], True),
        ('eval.splits=["val","test"]', ["eval", "splits"], ["val", "test"]),
    ],
)
def test_parse_override(item, keys, value):
    assert parse_override(item) == (keys, value)


def test_resolved_is_plain_and_hash_stable(tmp_path):
    import json

    a = load_recipe(write(tmp_path, GOOD))
    b = load_recipe(write(tmp_path, GOOD))
    json.dumps(a.resolved())
    assert a.config_hash() == b.config_hash()
    c = load_recipe(write(tmp_path, GOOD), ["train.seed=1"])
    assert c.config_hash() != a.config_hash()


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe):
    text = recipe.read_text()
    assert text.lstrip().startswith("#"), "recipes open with a comment explaining them"
    assert "lorakit run" in text, "the opening comment gives the exact run line"
    load_recipe(recipe, catalog=default_catalog())


def _doc_toml_blocks() -> list[tuple[str, str]]:
    import re

    blocks = []
    for doc in [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]:
        text = doc.read_text(encoding="utf-8")
        for m in re.finditer(r"^```toml\n(.*?)^```", text, re.S | re.M):
            line = text[: m.start()].count("\n") + 1
            blocks.append((f"{doc.relative_to(REPO)}:{line}", m.group(1)))
    return blocks


@pytest.mark.parametrize(("where", "block"), _doc_toml_blocks(), ids=lambda x: x.split("\n")[0])
def test_every_toml_example_in_the_docs_validates(tmp_path, where, block):
    """A recipe example the docs show is one `lorakit check` accepts (with a model and data
    added where it has none); a sweep.toml example is a valid space."""
    if block.lstrip().startswith("# sweep.toml"):
        from lorakit.sweep_space import read_space

        read_space(write(tmp_path, block, "sweep.toml"))
        return
    (tmp_path / "lm_tasks").mkdir()  # the folder evaluation.md's lm_eval_include names
    if "data.sources" not in block:
        block += '\n[[data.sources]]\nplugin = "chat_jsonl"\npath = "chat.jsonl"\n'
    try:
        load_recipe(write(tmp_path, block), catalog=default_catalog())
    except RecipeError as exc:
        pytest.fail(f"{where}: {exc}")


def test_non_finite_rates_and_negative_seed_are_recipe_errors(tmp_path):
    found = problems(
        tmp_path,
        GOOD,
        "train.learning_rate=inf",
        "train.max_grad_norm=nan",
        "train.weight_decay=inf",
        "train.seed=-1",
    )
    text = "\n".join(found)
    assert "[train].learning_rate" in text and "finite" in text
    assert "[train].max_grad_norm" in text and "[train].weight_decay" in text
    assert "[train].seed" in text
    assert len(found) == 4, found


@pytest.mark.parametrize("name", ["../../x", "/abs/path", ".", "..", "a/b", "", "-x", "a..b"])
def test_run_name_cannot_escape_the_output_folder(tmp_path, name):
    found = problems(tmp_path, GOOD, f'output.name="{name}"')
    assert any(p.startswith("[output].name") and "path component" in p for p in found), found


def test_ordinary_run_names_are_accepted(tmp_path):
    for name in ("run1", "smollm2_qlora-v2.1", "A"):
        assert load_recipe(write(tmp_path, GOOD), [f'output.name="{name}"']).name == name


def test_an_unknown_optimizer_is_a_recipe_error_naming_the_allowed_ones(tmp_path):
    found = problems(tmp_path, GOOD, 'train.optim="bogus"')
    assert len(found) == 1 and found[0].startswith("[train].optim"), found
    assert "'bogus'" in found[0] and "adamw_torch" in found[0] and "paged_adamw_8bit" in found[0]


def test_the_optimizer_table_matches_transformers():
    from lorakit.sections import OPTIMIZERS
    from transformers.training_args import OptimizerNames

    assert set(OPTIMIZERS) == {o.value for o in OptimizerNames}


def test_a_seed_past_32_bits_is_a_recipe_error(tmp_path):
    found = problems(tmp_path, GOOD, "train.seed=4294967296")
    assert len(found) == 1 and found[0].startswith("[train].seed"), found
    assert "2**32-1" in found[0]
    assert load_recipe(write(tmp_path, GOOD), ["train.seed=4294967295"]).train.seed == 2**32 - 1


@pytest.mark.parametrize("epochs", ["nan", "inf", "-inf", "-1.0"])
def test_epochs_must_be_a_finite_positive_number(tmp_path, epochs):
    found = problems(tmp_path, GOOD, "train.max_steps=-1", f"train.num_train_epochs={epochs}")
    assert len(found) == 1 and "num_train_epochs" in found[0], found
    assert found[0].startswith("[train]"), found


def test_a_negative_eval_max_examples_is_a_recipe_error(tmp_path):
    found = problems(tmp_path, GOOD, "eval.max_examples=-1")
    assert len(found) == 1 and found[0].startswith("[eval].max_examples"), found
    assert "0 or more" in found[0]
    assert load_recipe(write(tmp_path, GOOD), ["eval.max_examples=0"]).eval.max_examples == 0


@pytest.mark.parametrize(
    ("key", "unset"),
    [("save_total_limit", "keep every checkpoint"), ("eval_steps", "evaluate only at the end")],
)
@pytest.mark.parametrize("value", [0, -1])
def test_a_count_of_checkpoints_or_eval_steps_below_one_is_a_recipe_error(
    tmp_path, key, unset, value
):
    found = problems(tmp_path, GOOD, f"train.{key}={value}")
    assert len(found) == 1 and found[0].startswith(f"[train].{key}: must be 1 or more"), found
    assert unset in found[0]
    assert getattr(load_recipe(write(tmp_path, GOOD), [f"train.{key}=1"]).train, key) == 1


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            'peft.rank_pattern={q_proj="32"}',
            '[peft].rank_pattern.q_proj: expected an integer, got "32"',
        ),
        (
            "peft.rank_pattern={q_proj=1.5}",
            "[peft].rank_pattern.q_proj: expected an integer, got 1.5",
        ),
        ("peft.alpha_pattern={v_proj=true}", "[peft].alpha_pattern.v_proj: expected an integer"),
        ("peft.rank_pattern={q_proj=0}", "[peft].rank_pattern.q_proj: must be 1 or more"),
        ("peft.alpha_pattern={q_proj=-8}", "[peft].alpha_pattern.q_proj: must be 1 or more"),
        ('peft.rank_pattern={"layers.0.q_proj"=0}', '[peft].rank_pattern."layers.0.q_proj": must'),
        ("peft.rank_pattern=3", "[peft].rank_pattern: expected a table of integers, got 3"),
        ("log.options={mlflow=2}", "[log].options.mlflow: expected a table, got 2"),
    ],
)
def test_each_value_of_a_table_option_is_checked_at_its_own_key(tmp_path, override, expected):
    found = problems(tmp_path, GOOD, override)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_rank_and_alpha_patterns_in_range_are_kept(tmp_path):
    r = load_recipe(
        write(tmp_path, GOOD), ["peft.rank_pattern={q_proj=32}", "peft.alpha_pattern={q_proj=64}"]
    )
    assert r.peft.options.rank_pattern == {"q_proj": 32}
    assert r.peft.options.alpha_pattern == {"q_proj": 64}


@pytest.mark.parametrize(
    "overrides",
    [
        ["peft.lora_plus_ratio=inf"],
        ["peft.lora_plus_ratio=nan"],
        ["peft.dropout=nan"],
        ['quant.plugin="bnb-8bit"', "quant.threshold=inf"],
        ['quant.plugin="bnb-8bit"', "quant.threshold=nan"],
    ],
)
def test_non_finite_plugin_numbers_are_recipe_errors(tmp_path, overrides):
    """LoRA+ at an infinite ratio passed check and made the adapter NaN after training began."""
    found = problems(tmp_path, GOOD, *overrides)
    key = overrides[-1].split("=")[0].replace("peft.", "[peft].").replace("quant.", "[quant].")
    assert len(found) == 1 and found[0].startswith(f"{key}: must be a finite number"), found


@pytest.mark.parametrize(
    ("splits", "expected"),
    [
        ('["val", "val"]', "'val' is listed twice; list each split once"),
        ('["val", "test", "test"]', "'test' is listed twice"),
        ("[]", 'the list is empty; name the splits to score, e.g. ["val"]'),
        ('["vall"]', "unknown split 'vall'; use train, val or test"),
    ],
)
def test_eval_splits_listed_twice_empty_or_unknown_are_recipe_errors(tmp_path, splits, expected):
    """A split listed twice was scored twice (duplicate rows in eval_report.json); an empty list
    passed check and the run said 'nothing to evaluate: splits  are empty'."""
    found = problems(tmp_path, GOOD, f"eval.splits={splits}")
    assert len(found) == 1 and found[0].startswith(f"[eval].splits: {expected}"), found
    ok = load_recipe(write(tmp_path, GOOD), ['eval.splits=["test", "val"]'])
    assert ok.eval.splits == ("test", "val")


@pytest.mark.parametrize(
    "plugin",
    ["chat_jsonl", "instruction_jsonl", "markdown", "preference_jsonl", "report_json", "sharegpt"],
)
def test_an_empty_source_path_is_a_recipe_error(tmp_path, plugin):
    """path = "" was the recipe's own folder, read recursively (run outputs included)."""
    found = problems(tmp_path, GOOD, f'data.sources.0.plugin="{plugin}"', 'data.sources.0.path=""')
    assert len(found) == 1 and found[0].startswith("[data.sources.0].path: the path is empty"), (
        found
    )
    assert '"." for its own folder' in found[0]


@pytest.mark.parametrize(
    ("override", "got", "quoted"),
    [
        ("output.name=2024-01-01", "2024-01-01 (a TOML date)", "2024-01-01"),
        ("output.name=123", "123", "123"),
        ("train.from_adapter=true", "true", "true"),
        ("data.sources.0.path=1.5", "1.5", "1.5"),
    ],
)
def test_an_unquoted_override_where_a_string_is_expected_says_to_quote_it(
    tmp_path, override, got, quoted
):
    """output.name=2024-01-01 said 'expected a string, got datetime.date(2024, 1, 1)' and
    nothing about the shell and TOML quoting that makes it a string."""
    key = override.split("=")[0]
    section, _, name = key.rpartition(".")
    found = problems(tmp_path, GOOD, override)
    assert found == [
        f"[{section}].{name}: expected a string, got {got}; quote it: "
        f'{key}=\'"{quoted}"\' (in a recipe file: {name} = "{quoted}")'
    ]
    r = load_recipe(
        write(tmp_path, GOOD), ["output.name='2024-01-01'", 'train.from_adapter="true"']
    )
    assert r.name == "2024-01-01" and r.train.from_adapter == "true"


def test_the_quoting_hint_is_only_for_the_option_s_own_value(tmp_path):
    found = problems(tmp_path, GOOD, "eval.splits=[2024-01-01]", "peft.lora_plus_ratio=true")
    assert not any("quote it" in p for p in found), found
