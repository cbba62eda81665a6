"""lm-evaluation-harness tasks ([eval].lm_eval_tasks, ``lorakit eval --lm-eval``) on the base
and the tuned model (adapter loaded, not merged), offline with local task YAMLs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import chat_records, load_tiny_model, tiny_recipe, write_jsonl
from lorakit.errors import RecipeError
from lorakit.evaluation.harness import parse_results
from lorakit.recipe import load_recipe

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Extract: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

PPL_YAML = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def write_tasks(folder: Path) -> Path:
    """Two local lm-eval tasks over local JSONL files: 8 multiple-choice items and 8 texts in
    the training data's style (a continuous score, so adapter on and off must differ)."""
    folder.mkdir(parents=True, exist_ok=True)
    records = chat_records(8, seed=5)
    mc = []
    for r in records:
        fields = json.loads(r["messages"][1]["content"])
        mc.append(
            {
                "question": r["messages"][0]["content"].removeprefix("Extract: "),
                "choices": [fields["color"], "purple", "orange"],
                "answer": 0,
            }
        )
    text = [
        {"text": r["messages"][0]["content"] + " " + r["messages"][1]["content"]} for r in records
    ]
    write_jsonl(folder / "mc.jsonl", mc)
    write_jsonl(folder / "ppl.jsonl", text)
    # datasets reads data_files relative to the working directory: absolute paths
    (folder / "tiny_mc.yaml").write_text(MC_YAML.format(data=folder / "mc.jsonl"))
    (folder / "tiny_ppl.yaml").write_text(PPL_YAML.format(data=folder / "ppl.jsonl"))
    return folder


def test_results_are_read_per_task_without_stderr_or_empty_groups():
    # the shape simple_evaluate returns (lm_eval 0.4.13): "metric,filter" keys
    out = {
        "results": {
            "grp": {" ": " ", "alias": "grp"},
            "tiny_mc": {"alias": "tiny_mc", "acc,none": 0.625, "acc_stderr,none": "N/A"},
            "gsm": {
                "alias": "gsm",
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": 0.1,
                "exact_match,flexible-extract": 0.5,
            },
            "ppl": {"word_perplexity,none": 12.5, "bits_per_byte,none": 1.25},
        },
        "higher_is_better": {
            "tiny_mc": {"acc": True},
            "gsm": {"exact_match": True},
            "ppl": {"word_perplexity": False, "bits_per_byte": False},
        },
        "n-samples": {"tiny_mc": {"original": 8, "effective": 8}},
    }
    scores = parse_results(out)
    assert list(scores) == ["tiny_mc", "gsm", "ppl"]  # the group without a number is left out
    assert scores["tiny_mc"] == {
        "metrics": {"acc": 0.625},
        "higher_is_better": {"acc": True},
        "examples": 8,
    }
    assert scores["gsm"]["metrics"] == {
        "exact_match_strict-match": 0.25,
        "exact_match_flexible-extract": 0.5,
    }
    assert scores["ppl"]["higher_is_better"] == {"word_perplexity": False, "bits_per_byte": False}
    assert scores["ppl"]["examples"] is None


def _recipe(tmp_path, tiny_model_dir, extra):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    return tiny_recipe(tmp_path, tiny_model_dir, data, extra=extra)


def test_the_recipe_names_a_missing_task_folder_and_tasks_without_a_folder(tmp_path):
    path = _recipe(tmp_path, tmp_path, '[eval]\nlm_eval_include = "nowhere"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert "[eval].lm_eval_include" in text and "nowhere is not a folder" in text
    assert "[eval].lm_eval_include: set but [eval].lm_eval_tasks is empty" not in text
    write_tasks(tmp_path / "nowhere")
    with pytest.raises(RecipeError, match=r"lm_eval_tasks is empty; name the tasks"):
        load_recipe(path)
    recipe = load_recipe(path, ['eval.lm_eval_tasks=["tiny_mc"]'])
    assert list(recipe.eval.lm_eval_tasks) == ["tiny_mc"]


def test_no_lm_eval_keys_in_a_recipe_that_asks_for_none(tmp_path):
    """Runs without lm-eval hash and record what they did before the keys existed."""
    recipe = load_recipe(_recipe(tmp_path, tmp_path, ""))
    assert not any(k.startswith("lm_eval") for k in recipe.resolved()["eval"])
    tasks = write_tasks(tmp_path / "tasks")
    asked = load_recipe(
        recipe.path, ['eval.lm_eval_tasks=["tiny_mc"]', f'eval.lm_eval_include="{tasks}"']
    )
    assert asked.resolved()["eval"]["lm_eval_tasks"] == ["tiny_mc"]
    assert asked.config_hash() != recipe.config_hash()


def test_without_the_package_the_recipe_and_the_cli_say_how_to_install_it(
    tmp_path, monkeypatch, cli
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a)
    )
    path = _recipe(tmp_path, tmp_path, '[eval]\nlm_eval_tasks = ["arc_easy"]\n')
    code, _, err = cli("check", path)
    assert code == 2
    assert "[eval].lm_eval_tasks: lm-evaluation-harness (the Python package 'lm_eval')" in err
    assert "pip install 'lorakit[lmeval]'" in err
    assert "Traceback" not in err
    run = tmp_path / "runs" / "recipe"
    run.mkdir(parents=True)
    code, _, err = cli("eval", path, "--lm-eval", "arc_easy")
    assert code == 2 and "pip install 'lorakit[lmeval]'" in err and "Traceback" not in err


def _lm_eval_direct(model, tokenizer, tasks, folder):
    """lm-eval run by hand on ``model``, as a user would, without lorakit."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4),
        tasks=tasks,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        log_samples=False,
        bootstrap_iters=0,
    )
    return parse_results(out)


def _lm_rows(report_path):
    report = json.loads(report_path.read_text())
    rows = {
        (r["split"], "base" if r["adapter"] is None else "tuned"): r["metrics"]
        for r in report["results"]
        if r["split"].startswith("lm_eval/")
    }
    return report, rows


@pytest.mark.slow
def test_base_and_tuned_scores_come_from_the_base_and_the_adapter(tmp_path, tiny_model_dir, cli):
    pytest.importorskip("lm_eval")
    from peft import PeftModel
    from transformers import AutoTokenizer

    tasks = write_tasks(tmp_path / "tasks")
    eval_keys = """
[eval]
canary = false
max_examples = 4
lm_eval_tasks = ["tiny_mc", "tiny_ppl"]
lm_eval_include = "tasks"
lm_eval_batch_size = 4
"""
    recipe = _recipe(tmp_path, tiny_model_dir, 'name = "lm"\n' + eval_keys)
    recipe.write_text(recipe.read_text().replace("max_steps = 4", "max_steps = 8"))
    code, _, err = cli("run", recipe)
    assert code == 0, err
    assert "lm-eval tiny_mc, tiny_ppl: base model" in err
    assert "lm-eval tiny_ppl: word_perplexity" in err and "bits_per_byte" in err
    assert "Running loglikelihood requests" not in err  # no bars in a log
    run = tmp_path / "runs" / "lm"
    report, rows = _lm_rows(run / "eval_report.json")
    assert set(rows) == {
        ("lm_eval/tiny_mc", "base"),
        ("lm_eval/tiny_mc", "tuned"),
        ("lm_eval/tiny_ppl", "base"),
        ("lm_eval/tiny_ppl", "tuned"),
    }
    section = report["lm_eval"]
    assert section["tasks"] == ["tiny_mc", "tiny_ppl"]
    assert section["metric_kinds"]["acc"] == "generation"  # a share: shown in points
    assert section["higher_is_better"]["bits_per_byte"] is False
    base_ppl = rows[("lm_eval/tiny_ppl", "base")]["bits_per_byte"]
    tuned_ppl = rows[("lm_eval/tiny_ppl", "tuned")]["bits_per_byte"]
    assert base_ppl != pytest.approx(tuned_ppl, rel=1e-3)  # the adapter was on, then off
    assert "## lm-evaluation-harness" in (run / "report.md").read_text()

    # the same numbers from lm-eval run by hand on the base alone and on base + saved adapter
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    base = load_tiny_model(tiny_model_dir)
    by_hand = _lm_eval_direct(base, tokenizer, ["tiny_mc", "tiny_ppl"], tasks)
    tuned = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    tuned_by_hand = _lm_eval_direct(tuned, tokenizer, ["tiny_mc", "tiny_ppl"], tasks)
    for task in ("tiny_mc", "tiny_ppl"):
        for name, value in by_hand[task]["metrics"].items():
            assert rows[(f"lm_eval/{task}", "base")][name] == pytest.approx(value, rel=1e-4)
        for name, value in tuned_by_hand[task]["metrics"].items():
            assert rows[(f"lm_eval/{task}", "tuned")][name] == pytest.approx(value, rel=1e-4)

    # lorakit eval --lm-eval: the run scored again from disk, one task, the folder given here
    code, _, err = cli("eval", run, "--lm-eval", "tiny_ppl", "--lm-eval-include", tasks)
    assert code == 0, err
    again = _lm_rows(run / "eval_report.json")[1]
    assert set(again) == {("lm_eval/tiny_ppl", "base"), ("lm_eval/tiny_ppl", "tuned")}
    for key, metrics in again.items():
        assert metrics == pytest.approx(rows[key], rel=1e-4)

    # compare lists the tasks beside the splits
    code, out, err = cli("compare", tmp_path / "runs")
    assert code == 0, err
    assert "lm_eval/tiny_ppl" in out and "bits_per_byte" in out

    # a misspelled task stops the run before it trains, with the closest name
    code, _, err = cli("run", recipe, 'eval.lm_eval_tasks=["tiny_mcq"]', "output.name=typo")
    assert code == 2
    assert "'tiny_mcq' is not an lm-eval task (did you mean 'tiny_mc'?)" in err
    assert not (tmp_path / "runs" / "typo" / "adapter").exists()


def test_a_task_whose_data_cannot_be_fetched_is_named(monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lorakit.errors import RunError
    from lorakit.evaluation import harness

    def offline(**_kwargs):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    monkeypatch.setattr(harness, "_model_class", lambda: lambda **_kwargs: object())
    plan = harness.HarnessPlan(("arc_easy",), None, 4, None, 1)
    with pytest.raises(RunError, match="could not load the data of arc_easy") as err:
        harness.score_tasks(object(), object(), plan, manager=None)
    assert "--lm-eval-include" in err.value.fix  # was a ConnectionError traceback


def test_the_digest_covers_the_data_files_the_tasks_read(tmp_path):
    """A baseline's lm-eval base scores were reused after a task's data file changed: the
    digest hashed the task YAMLs alone, not the data_files they name."""
    pytest.importorskip("lm_eval")
    from lorakit.evaluation.harness import HarnessPlan

    tasks = write_tasks(tmp_path / "tasks")
    data = tmp_path / "elsewhere.jsonl"  # outside the include folder, like /data/my_task.jsonl
    write_jsonl(data, [{"text": "one"}])
    (tasks / "tiny_ppl.yaml").write_text(PPL_YAML.format(data=data))
    plan = HarnessPlan(("tiny_ppl",), tasks, None, None, 1)
    before = plan.digest
    assert plan.digest == before
    write_jsonl(data, [{"text": "one"}, {"text": "two"}])
    assert plan.digest != before


def test_a_reused_base_over_other_documents_is_scored_again(monkeypatch):
    """Base and tuned lm-eval scores are shown side by side only over the same documents."""
    pytest.importorskip("lm_eval")
    import contextlib

    from lorakit.evaluation import harness

    plan = harness.HarnessPlan(("t",), None, None, None, 1)
    calls = []

    def score(model, tokenizer, plan, manager):
        calls.append(model)
        return {"t": {"metrics": {"acc": 0.5}, "higher_is_better": {"acc": True}, "examples": 9}}

    monkeypatch.setattr(harness, "task_manager", lambda plan: None)
    monkeypatch.setattr(harness, "score_tasks", score)
    monkeypatch.setattr(harness, "adapter_off", lambda model: contextlib.nullcontext())
    cached = {
        "lm_eval": {"digest": plan.digest, "higher_is_better": {"acc": True}},
        "results": [
            {
                "split": "lm_eval/t",
                "adapter": None,
                "metrics": {"acc": 0.1},
                "counts": {"examples": 5},
            }
        ],
    }
    said = []
    out = harness.score_harness(
        "model", None, plan, tuned_too=True, with_base=True, cached_report=cached, say=said.append
    )
    assert out.base is not None and out.base["t"]["examples"] == 9
    assert len(calls) == 2 and any("scoring the base model again" in s for s in said)
    # the same documents: the baseline's base scores stand
    cached["results"][0]["counts"]["examples"] = 9
    calls.clear()
    out = harness.score_harness(
        "model", None, plan, tuned_too=True, with_base=True, cached_report=cached, say=said.append
    )
    assert len(calls) == 1 and out.base is not None and out.base["t"]["metrics"] == {"acc": 0.1}
