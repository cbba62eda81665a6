"""The forgetting canary: general text and generic instructions scored for the base and the
tuned model beside the task, with a warning when the general loss rose."""

from __future__ import annotations

import json
import textwrap

import pytest
from helpers import build_data_tokenizer, chat_records, write_jsonl
from lorakit.catalog import default_catalog
from lorakit.evaluation.canary import (
    GeneralScores,
    cached_canary,
    general_texts,
    prepare_canary,
    rise,
    warning,
)


def _canary():
    entry = default_catalog().get("formatter", "chat_template")
    return prepare_canary(entry.factory(entry.options_class()), build_data_tokenizer(), 64)


def test_the_texts_come_from_pythons_own_library_and_are_stable():
    texts = general_texts()
    assert len(texts) >= 12 and all(t.strip() for t in texts)
    assert texts == general_texts()
    assert any("statement" in t for t in texts)  # pydoc's pages of the language reference
    a, b = _canary(), _canary()
    assert a is not None and b is not None and a.digest == b.digest
    assert all(1 < len(r.input_ids) <= 64 for r in a.rows)
    assert list(a.rows[0].labels) == list(a.rows[0].input_ids)  # every token scored
    assert len(a.prompts) == 4 and all(p.endswith("<|im_start|>assistant\n") for p in a.prompts)


def test_the_warning_is_relative_to_the_base_and_past_the_threshold_only():
    base = {"general_loss": 3.0, "general_stops": 1.0}
    assert rise(base, {"general_loss": 3.3}) == pytest.approx(0.1)
    assert warning(0.1, 0.05) is not None and "rose 10.0%" in warning(0.1, 0.05)
    assert warning(0.04, 0.05) is None and warning(None, 0.05) is None
    assert rise(None, base) is None and rise(base, None) is None


def test_scores_go_into_the_report_rows_and_a_baseline_is_reused_only_for_the_same_texts():
    canary = _canary()
    assert canary is not None
    scores = GeneralScores(
        canary,
        {"general_loss": 3.0, "general_stops": 0.75},
        {"general_loss": 3.6, "general_stops": 0.5},
        0.05,
    )
    rows = scores.results("m", "runs/x/adapter")
    assert [(r["split"], r["adapter"]) for r in rows] == [
        ("general", None),
        ("general", "runs/x/adapter"),
    ]
    report = {"canary": scores.section(), "results": rows}
    assert report["canary"]["warning"] and report["canary"]["rise"] == pytest.approx(0.2)
    assert cached_canary(report, canary.digest) == {"general_loss": 3.0, "general_stops": 0.75}
    assert cached_canary(report, "another-python") is None
    text = "\n".join(scores.markdown())
    assert "| general_loss | 3.0000 | 3.6000 | +0.6000 |" in text and "**Warning:**" in text


@pytest.mark.slow
@pytest.mark.embedded
def test_a_tuned_model_that_forgot_is_warned_about_and_compare_shows_it(tmp_path, cli):
    """The embedded model trained hard on a narrow task (lr 1e-2): its loss on general text
    rises well past the threshold, the run warns and the report and compare show both."""
    write_jsonl(tmp_path / "chat.jsonl", chat_records(24))
    recipe = tmp_path / "forget.toml"
    recipe.write_text(
        textwrap.dedent(
            f"""
            [peft]
            r = 16
            alpha = 32
            [train]
            max_steps = 8
            per_device_train_batch_size = 4
            learning_rate = 1e-2
            save_steps = 8
            max_length = 128
            [eval]
            metrics = ["eval_loss"]
            canary_max_rise = 0.1
            [[data.sources]]
            plugin = "chat_jsonl"
            path = "chat.jsonl"
            [output]
            dir = "{tmp_path / "runs"}"
            """
        )
    )
    code, _, err = cli("run", recipe)
    assert code == 0, err
    report = json.loads((tmp_path / "runs" / "forget" / "eval_report.json").read_text())
    assert report["canary"]["rise"] > 0.1, report["canary"]
    assert "warning: the tuned model's loss on general text rose" in err
    general = {
        r["adapter"] is None: r["metrics"] for r in report["results"] if r["split"] == "general"
    }
    assert general[False]["general_loss"] > general[True]["general_loss"]
    assert (
        "General text: forgetting canary"
        in (tmp_path / "runs" / "forget" / "report.md").read_text()
    )
    code, out, _ = cli("compare", tmp_path / "runs")
    assert code == 0 and "| general |" in out and "general_loss" in out
