"""End to end on the tiny Llama: run -> eval report, baseline reuse, ``lorakit eval``, compare."""

from __future__ import annotations

import json

import pytest
from helpers import chat_records, tiny_recipe, write_jsonl

pytestmark = pytest.mark.slow

EVAL = """
[eval]
metrics = ["eval_loss", "perplexity", "exact_match", "json_valid", "stops"]
max_new_tokens = 6
batch_size = 4
max_examples = 5
"""


def test_run_baseline_eval_compare(tmp_path, tiny_model_dir, chat_file, cli):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "ev"\n' + EVAL)
    code, _, err = cli("baseline", recipe)
    assert code == 0, err
    run = tmp_path / "runs" / "ev"
    base = json.loads((run / "baseline" / "eval_report.json").read_text())
    assert [(r["split"], r["adapter"]) for r in base["results"]] == [
        ("val", None),
        ("general", None),
    ]

    code, _, err = cli("run", recipe, "train.eval_steps=2")
    assert code == 0, err
    assert "reusing the baseline" in err
    # the base's forgetting canary comes from the baseline too: the general text is scored
    # for the tuned model alone
    assert "forgetting canary: general text" not in err and "forgetting canary: base +" in err
    report = json.loads((run / "eval_report.json").read_text())
    assert report["config_hash"] and report["data_fingerprint"]
    base_row, tuned_row, base_general, _ = report["results"]
    assert base_general["metrics"] == base["results"][1]["metrics"]
    assert base_row["adapter"] is None and tuned_row["adapter"].endswith("adapter")
    assert base_row["metrics"] == base["results"][0]["metrics"]
    assert set(tuned_row["metrics"]) == {
        "eval_loss",
        "perplexity",
        "exact_match",
        "json_valid",
        "stops",
    }
    assert tuned_row["counts"]["examples"] == min(5, tuned_row["counts"]["examples"])
    preds = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    assert preds and {"prompt", "reference", "base", "tuned"} <= set(preds[0])
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "| metric | base | tuned | change |" in (run / "report.md").read_text()
    assert any(
        "eval_loss" in json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
    )

    # eval on the run folder gives the same tuned numbers (greedy, same weights)
    code, _, err = cli("eval", run, "--no-baseline")
    assert code == 0, err
    again = json.loads((run / "eval_report.json").read_text())["results"]
    assert [(r["split"], r["adapter"] is None) for r in again] == [
        ("val", False),
        ("general", False),
    ]
    assert again[0]["metrics"] == pytest.approx(tuned_row["metrics"], rel=1e-5)

    code, out, _ = cli("compare", tmp_path / "runs", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [(r["run"], r["split"], r["adapter"] is None) for r in rows] == [
        ("ev", "val", False),
        ("ev", "general", False),
        ("ev", "val", True),
        ("ev", "general", True),
    ]


def test_eval_without_a_run_is_a_clear_error(tmp_path, tiny_model_dir, chat_file, cli):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "none"')
    code, _, err = cli("eval", recipe)
    assert code != 0 and "lorakit run" in err


def test_eval_scores_the_runs_saved_splits_when_sources_change(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """A run's saved data/splits are its single source of truth: after the source file changes,
    `lorakit eval RUN` scores the same val examples and says the sources changed."""
    from lorakit.data.pipeline import read_split_files
    from lorakit.data.splits import fingerprint

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "pinned"')
    assert cli("run", recipe, "train.max_steps=2", 'eval.metrics=["eval_loss"]')[0] == 0
    run = tmp_path / "runs" / "pinned"
    saved = read_split_files(run / "data" / "splits")
    report = json.loads((run / "data_report.json").read_text())
    assert saved is not None and saved.fingerprint == report["fingerprint"], "exact round trip"
    assert fingerprint(saved.val) and saved.val
    before = json.loads((run / "eval_report.json").read_text())["results"][0]["counts"]
    chat_file.write_text("".join(chat_file.read_text().splitlines(True)[:10]))  # data shrank
    code, _, err = cli("eval", str(run), "--no-baseline")
    assert code == 0, err
    assert "sources changed" in err
    after = json.loads((run / "eval_report.json").read_text())["results"][0]["counts"]
    assert after["examples"] == before["examples"] == len(saved.val)


def test_downstream_uses_the_settings_the_adapter_was_trained_with(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """An attempt that stopped during start-up with format.plugin=instruction, then a restart
    without it that trains: eval (and export, generate: open_run) use the restart's settings,
    so a re-eval scores exactly what the run scored. An edited recipe is refused by name."""
    from lorakit.catalog import default_catalog
    from lorakit.load_run import open_run

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "twice"')
    run = tmp_path / "runs" / "twice"
    metrics = 'eval.metrics=["eval_loss"]'
    code, _, err = cli(
        "run", recipe, "format.plugin=instruction", 'peft.target_modules=["nope"]', metrics
    )
    assert code == 2 and (run / "run.json").is_file(), err  # claimed, stopped before step 1
    code, _, err = cli("run", recipe, "train.max_steps=2", metrics)
    assert code == 0 and "started again" in err, err
    assert open_run(run, default_catalog()).format.name == "chat_template"
    scored = json.loads((run / "eval_report.json").read_text())["results"]
    code, _, err = cli("eval", run, "--no-baseline", metrics)
    assert code == 0, err
    again = json.loads((run / "eval_report.json").read_text())["results"]
    assert [r["metrics"] for r in again] == [r["metrics"] for r in scored if r["adapter"]]
    # the recipe edited after training: eval says so and scores nothing
    recipe.write_text(recipe.read_text() + '\n[format]\nplugin = "instruction"\n')
    code, _, err = cli("eval", recipe, "--no-baseline")
    assert code == 2 and "Traceback" not in err, err
    assert "format.plugin ('chat_template' -> 'instruction')" in err, err
    assert json.loads((run / "eval_report.json").read_text())["results"] == again


def test_a_baseline_is_reused_only_with_the_same_eval_rows(tmp_path, tiny_model_dir, cli):
    """A baseline scored with data.overlength=drop kept fewer eval_loss rows than a run with
    truncate scores: reusing it compared base and tuned over different rows."""
    records = chat_records(40)
    for i, r in enumerate(records[:8]):  # 8 val examples, half of them over max_length
        r["meta"] = {"split": "val"}
        if i % 2 == 0:
            r["messages"][0]["content"] += " The quick brown fox jumps over the lazy dog." * 3
    data = write_jsonl(tmp_path / "data.jsonl", records)
    extra = 'name = "ol"\n[eval]\nmetrics = ["eval_loss"]\ncanary = false\n'
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data, extra=extra)
    code, _, err = cli("baseline", recipe, "data.overlength=drop")
    assert code == 0, err
    code, _, err = cli("run", recipe, "data.overlength=truncate", "train.max_steps=2")
    assert code == 0, err
    assert "reusing the baseline" not in err
    report = json.loads((tmp_path / "runs" / "ol" / "eval_report.json").read_text())
    base, tuned = report["results"]
    assert base["counts"]["loss_examples"] == tuned["counts"]["loss_examples"]
    # truncated rows are scored (cut to max_length), and report.md says so
    assert tuned["counts"]["truncated"] == 4 and not tuned["counts"]["skipped"]
    md = (tmp_path / "runs" / "ol" / "report.md").read_text()
    assert "- scored after truncation: 4 x loss rows cut to train.max_length" in md
    assert "not scored" not in md

    # the same eval rows: reused
    code, _, err = cli("eval", tmp_path / "runs" / "ol", "data.overlength=truncate")
    assert code == 0, err
    assert "reusing the baseline" not in err  # the run wrote no baseline folder of its own
    code, _, err = cli("baseline", recipe, "data.overlength=truncate")
    assert code == 0, err
    code, _, err = cli("eval", tmp_path / "runs" / "ol", "data.overlength=truncate")
    assert code == 0 and "reusing the baseline" in err, err


def test_a_baseline_with_line_separators_in_its_predictions_is_reused(
    tmp_path, tiny_model_dir, cli
):
    """predictions.jsonl keeps U+2028, U+2029 and U+0085 raw (ensure_ascii=False):
    str.splitlines() cut the line there, and the run crashed after training."""
    records = chat_records(40)
    records[0]["meta"] = {"split": "val"}
    records[0]["messages"][1]["content"] = "one\u2028two\u2029three\x85four"
    data = write_jsonl(tmp_path / "data.jsonl", records)
    extra = 'name = "ls"\n[eval]\nmetrics = ["exact_match"]\nmax_new_tokens = 4\ncanary = false\n'
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data, extra=extra)
    assert cli("baseline", recipe)[0] == 0
    run = tmp_path / "runs" / "ls"
    assert "\u2028" in (run / "baseline" / "predictions.jsonl").read_text(encoding="utf-8")
    code, _, err = cli("run", recipe, "train.max_steps=2")
    assert code == 0, err
    assert "reusing the baseline" in err
    assert (run / "eval_report.json").is_file()

    # a damaged baseline is a cache to score again, not a traceback
    preds = run / "baseline" / "predictions.jsonl"
    preds.write_text(preds.read_text(encoding="utf-8")[:-20], encoding="utf-8")
    code, _, err = cli("eval", run)
    assert code == 0, err
    assert "not reusing the baseline" in err and "scoring the base model again" in err
    assert "scoring the base model on" in err
    # a damaged baseline report too (its fix said to delete the run and train again)
    (run / "baseline" / "eval_report.json").write_text("{")
    code, _, err = cli("eval", run)
    assert code == 0, err
    assert "not reusing the baseline" in err and "is not valid JSON" in err
    assert "train again" not in err and "scoring the base model on" in err
