"""``[eval]`` validation: unknown metric names and metric options are recipe errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from lorakit.errors import RecipeError
from lorakit.recipe import load_recipe

BASE = """
[[data.sources]]
plugin = "chat_jsonl"
path = "chat.jsonl"
"""


def problems(tmp_path: Path, text: str, *overrides: str) -> list[str]:
    path = tmp_path / "r.toml"
    path.write_text(BASE + text, encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value.problems


def test_unknown_metric_names_the_key_and_suggests(tmp_path):
    got = problems(tmp_path, '[eval]\nmetrics = ["eval_loss", "exact_mach"]\n')
    assert len(got) == 1
    assert got[0].startswith('[eval].metrics[1]: unknown metric "exact_mach"')
    assert "did you mean 'exact_match'?" in got[0]


def test_unknown_metric_from_an_override(tmp_path):
    got = problems(tmp_path, "", 'eval.metrics=["perplexty"]')
    assert "[eval].metrics[0]" in got[0] and "'perplexity'" in got[0]


def test_metric_options_are_validated(tmp_path):
    text = """
[eval]
metrics = ["exact_match", "bleu"]
[eval.metric_options.exact_match]
ignore_cse = true
[eval.metric_options.bleu]
tokenize = "words"
[eval.metric_options.rouge_l]
use_stemmer = true
"""
    got = problems(tmp_path, text)
    assert any(
        p.startswith(
            "[eval.metric_options.exact_match].ignore_cse: unknown key, did you mean ignore_case?"
        )
        for p in got
    ), got
    assert any(p.startswith("[eval.metric_options.bleu].tokenize:") for p in got), got
    assert any(
        p.startswith("[eval.metric_options.rouge_l]: 'rouge_l' is not in [eval].metrics")
        for p in got
    ), got


def test_valid_eval_section_and_metric_options(tmp_path):
    path = tmp_path / "r.toml"
    text = '[eval]\nmetrics = ["exact_match", "stops"]\n[eval.metric_options.exact_match]\nignore_case = true\n'
    path.write_text(BASE + text, encoding="utf-8")
    recipe = load_recipe(path)
    from lorakit.catalog import default_catalog
    from lorakit.components import build_metrics

    metrics = build_metrics(default_catalog(), recipe.eval)
    assert list(metrics) == ["exact_match", "stops"]
    assert metrics["exact_match"].options.ignore_case is True


def test_default_recipe_validates():
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "smollm2_qlora.toml")
    assert recipe.quant.name == "bnb-4bit"
    assert "json_match" in recipe.eval.metrics and "stops" in recipe.eval.metrics
