"""The run scores the model it has just trained, in memory; ``lorakit eval`` and ``lorakit
baseline`` load it from the run folder. Both must score the same function: the adapter as
saved, and its base with the adapter switched off."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
from helpers import tiny_recipe

pytestmark = pytest.mark.slow

EVAL = """
[eval]
metrics = ["eval_loss", "perplexity", "exact_match", "stops"]
max_new_tokens = 6
batch_size = 4
max_examples = 6
baseline = true
"""


def _report(path):
    data = json.loads(path.read_text())
    return [(r["adapter"] is None, r["split"], r["metrics"], r["counts"]) for r in data["results"]]


def _predictions(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["id"], r.get("base"), r.get("tuned")) for r in rows]


@pytest.mark.parametrize("quant", ["none", "bnb-4bit"])
def test_the_run_scores_what_eval_loads_from_disk(
    tmp_path, tiny_model_dir, chat_file, cli, compute_dtype, quant
):
    recipe = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        chat_file,
        quant=quant,
        dtype=compute_dtype,
        extra='name = "mem"\n' + EVAL,
    )
    code, _, err = cli("run", recipe)
    assert code == 0, err
    assert "reusing the baseline" not in err  # the run scored its base itself, in memory
    run = tmp_path / "runs" / "mem"
    in_memory = _report(run / "eval_report.json")
    in_memory_preds = _predictions(run / "predictions.jsonl")
    # base, then tuned, on the val split, then on the forgetting canary's general text
    assert [(row[0], row[1]) for row in in_memory] == [
        (True, "val"),
        (False, "val"),
        (True, "general"),
        (False, "general"),
    ]

    # the same run scored again from the saved adapter (and a freshly loaded base): identical
    (run / "eval_report.json").unlink()
    code, _, err = cli("eval", run)
    assert code == 0, err
    assert _report(run / "eval_report.json") == in_memory
    assert _predictions(run / "predictions.jsonl") == in_memory_preds

    # the base with the adapter switched off is the base model alone
    code, _, err = cli("baseline", recipe)
    assert code == 0, err
    alone = _report(run / "baseline" / "eval_report.json")
    assert alone == [in_memory[0], in_memory[2]]


def test_release_trainer_lets_go_of_everything_but_the_model(tmp_path, tiny_model_dir, chat_file):
    """After training the run keeps the model alone: the optimizer's state, the trainer's
    wrappers and the adapter's gradients are freed before evaluation starts."""
    from lorakit.catalog import default_catalog
    from lorakit.components import build_components
    from lorakit.recipe import load_recipe
    from lorakit.rundir import RunDir
    from lorakit.runner import (
        find_start,
        load_for_training,
        prepare_data,
        release_trainer,
        train,
    )
    from lorakit.tracking import Loggers

    recipe = load_recipe(
        tiny_recipe(tmp_path, tiny_model_dir, chat_file), ("train.max_steps=1",), default_catalog()
    )
    components = build_components(recipe, default_catalog())
    run = RunDir(recipe.run_dir)
    start = find_start(run, recipe, None)
    prepared = prepare_data(recipe, components, run, start)
    dtype = components.quant.compute_dtype("cpu")
    base = load_for_training(
        recipe, components, prepared, "cpu", compute_dtype=dtype, reference=None
    )
    trainer = train(recipe, base, prepared, run, Loggers(lambda _: None), start)
    optimizer = weakref.ref(trainer.optimizer)

    model = release_trainer(trainer)
    gc.collect()
    assert model is base.model
    assert optimizer() is None  # Adam's moments are gone
    assert trainer.model is None and trainer.callback_handler.model is None
    assert all(p.grad is None for p in model.parameters())
