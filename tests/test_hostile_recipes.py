"""Recipes and overrides built to break the reader: nesting thousands deep, integers of thousands
of digits. Each is one recipe error with its key path and exit 2; no RecursionError, no
ValueError traceback."""

from __future__ import annotations

import json

import pytest
from helpers import write_recipe

GOOD = {
    "id": "good",
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
}


@pytest.fixture
def recipe(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps(GOOD) + "\n")
    return write_recipe(tmp_path, [{"plugin": "chat_jsonl", "path": "data.jsonl"}])


def _check(cli, *args):
    code, out, err = cli("check", *args)
    assert code == 2, (out, err[-2000:])
    assert "Traceback" not in out + err
    assert len(err) < 2000, err[-2000:]
    return err


@pytest.mark.parametrize("depth", [3_000, 100_000])
@pytest.mark.parametrize(
    "shape",
    [
        lambda n: "x = " + "[" * n + "]" * n,
        lambda n: "x = " + "{a=" * n + "1" + "}" * n,
        lambda n: "x" + ".a" * n + " = 1",
        lambda n: "[" + ".".join(["a"] * n) + "]",
    ],
    ids=["arrays", "inline tables", "dotted key", "table header"],
)
def test_a_recipe_nested_thousands_deep_is_a_recipe_error(recipe, cli, shape, depth):
    recipe.write_text(shape(depth) + "\n" + recipe.read_text())
    err = _check(cli, str(recipe))
    assert "nested more than 64 tables or lists deep" in err


@pytest.mark.parametrize(
    "value",
    [
        lambda n: "[" * n + "]" * n,
        lambda n: "{a=" * n + "1" + "}" * n,
    ],
    ids=["arrays", "inline tables"],
)
def test_an_override_nested_thousands_deep_is_a_recipe_error(recipe, cli, value):
    err = _check(cli, str(recipe), "train.x=" + value(5000))
    assert "override 'train.x': nested more than 64" in err


def test_an_override_key_thousands_deep_is_a_recipe_error(recipe, cli):
    err = _check(cli, str(recipe), "train" + ".a" * 5000 + "=1")
    assert "nested more than 64" in err


def test_an_integer_of_thousands_of_digits_is_refused_with_its_key(recipe, cli):
    recipe.write_text(recipe.read_text() + "\n[train]\nmax_steps = " + "9" * 5000 + "\n")
    err = _check(cli, str(recipe))
    assert "too large to read (over 64 bits)" in err
    assert "write large ids or numbers as strings" in err


def test_an_integer_outside_64_bits_names_its_key(recipe, cli):
    recipe.write_text(recipe.read_text() + "\n[train]\nmax_steps = " + "9" * 30 + "\n")
    err = _check(cli, str(recipe))
    assert "train.max_steps: integer outside the 64-bit range" in err


@pytest.mark.parametrize("digits", [30, 5000])
def test_an_override_integer_outside_64_bits_is_refused(recipe, cli, digits):
    err = _check(cli, str(recipe), "train.max_steps=" + "9" * digits)
    assert "train.max_steps" in err
    assert "64-bit" in err or "64 bits" in err
