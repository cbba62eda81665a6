"""Reports and ``lorakit compare`` from synthetic results (no model needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from lorakit.catalog import default_catalog
from lorakit.components import build_metrics
from lorakit.decoding import Generation
from lorakit.evaluation.collect import collect_rows
from lorakit.evaluation.plot import plot_losses
from lorakit.evaluation.report import fmt, write_outputs
from lorakit.evaluation.scoring import SplitResult
from lorakit.evaluation.sets import EvalSet
from lorakit.sections import EvalSection


def _set() -> EvalSet:
    return EvalSet(
        "val", 2, [], ["a", "b"], ["q1", "q2"], ["<p1>", "<p2>"], ['{"x": 1}', '{"x": 2}'], {}
    )


def _result(texts, stopped, metrics) -> SplitResult:
    counts = {
        "examples": 2,
        "loss_examples": 2,
        "supervised_tokens": 10,
        "generated": 2,
        "skipped": {},
    }
    gens = [Generation(t, s, 3) for t, s in zip(texts, stopped, strict=True)]
    return SplitResult("val", metrics, counts, gens)


def _write(folder: Path, run: str, adapter: str | None, key: str = "k1") -> None:
    metrics = build_metrics(
        default_catalog(), EvalSection(metrics=["eval_loss", "json_match", "stops"])
    )
    info = {
        "run": run,
        "model": "tiny",
        "adapter": adapter,
        "config_hash": "h",
        "data_fingerprint": "f",
        "baseline_key": key,
    }
    base = [
        _result(
            ["nope", '{"x": 2}'], [False, True], {"eval_loss": 2.0, "json_match": 0.5, "stops": 0.5}
        )
    ]
    tuned = [
        _result(
            ['{"x": 1}', '{"x": 2}'],
            [True, True],
            {"eval_loss": 1.0, "json_match": 1.0, "stops": 1.0},
        )
    ]
    write_outputs(folder, info, [_set()], metrics, base, tuned if adapter else None, 1.0)


def test_report_files(tmp_path):
    _write(tmp_path, "r1", "runs/r1/adapter")
    report = json.loads((tmp_path / "eval_report.json").read_text())
    assert [(r["adapter"], r["split"]) for r in report["results"]] == [
        (None, "val"),
        ("runs/r1/adapter", "val"),
    ]
    assert report["metric_kinds"]["json_match"] == "generation"
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert preds[0] == {
        "split": "val",
        "id": "a",
        "prompt": "<p1>",
        "reference": '{"x": 1}',
        "base": "nope",
        "base_stopped": False,
        "tuned": '{"x": 1}',
        "tuned_stopped": True,
    }
    md = (tmp_path / "report.md").read_text()
    assert "| json_match | 50.0 | 100.0 | +50.0 (better) |" in md
    assert "| eval_loss | 2.0000 | 1.0000 | -1.0000 (better) |" in md
    assert "nope *(no stop)*" in md


def test_fmt():
    assert fmt(0.875, "generation") == "87.5"
    assert fmt(1.23456, "loss") == "1.2346"
    assert fmt(float("nan"), "loss") == "n/a"


def test_compare_rows_dedupe_the_baseline(tmp_path, cli):
    runs = tmp_path / "runs"
    _write(runs / "r1" / "baseline", "r1", None)
    _write(runs / "r1", "r1", "runs/r1/adapter")
    _write(runs / "r2", "r2", "runs/r2/adapter", key="k2")
    # a tracker's artifact store under the same folder holds a copy of r2's report
    (runs / "mlflow" / "artifacts" / "1").mkdir(parents=True)
    shutil.copy(runs / "r2" / "eval_report.json", runs / "mlflow" / "artifacts" / "1")
    rows = collect_rows(runs)
    assert [(r["run"], r["adapter"]) for r in rows] == [
        ("r1", None),
        ("r1", "runs/r1/adapter"),
        ("r2", None),
        ("r2", "runs/r2/adapter"),
    ]
    code, out, _ = cli("compare", runs, "--json")
    assert code == 0
    data = json.loads(out)
    assert data[1] == {
        "run": "r1",
        "run_name": "r1",
        "examples": 2,
        "model": "tiny",
        "adapter": "runs/r1/adapter",
        "split": "val",
        "metrics": {"eval_loss": 1.0, "json_match": 1.0, "stops": 1.0},
    }
    code, out, _ = cli("compare", runs)
    assert code == 0
    assert "| run | model | adapter | split | examples | eval_loss | json_match | stops |" in out
    assert "| r2 | tiny | tuned | val | 2 | 1.0000 | 100.0 | 100.0 |" in out


def test_compare_names_rows_by_their_folder_and_counts_examples(tmp_path, cli):
    """A run folder copied and evaluated again holds a report whose stored run name is the
    original's: its rows are named by the folder they came from, never twice "r1", and say how
    many examples each score is over; same-named folders in two places get their paths."""
    runs = tmp_path / "runs"
    _write(runs / "r1", "r1", "runs/r1/adapter")
    _write(runs / "r1-copy", "r1", "runs/r1-copy/adapter")
    _write(runs / "a" / "r2", "r2", "runs/a/r2/adapter", key="k2")
    _write(runs / "b" / "r2", "r2", "runs/b/r2/adapter", key="k3")
    code, out, err = cli("compare", runs, "--json")
    assert code == 0, err
    tuned = [(r["run"], r["run_name"], r["examples"]) for r in json.loads(out) if r["adapter"]]
    assert tuned == [("a/r2", "r2", 2), ("b/r2", "r2", 2), ("r1", "r1", 2), ("r1-copy", "r1", 2)]
    code, out, err = cli("compare", runs)
    assert code == 0, err
    assert "| run | model | adapter | split | examples | eval_loss |" in out, out
    assert "| r1-copy (run r1) | tiny | tuned | val | 2 | 1.0000 |" in out, out
    assert "| r1 | tiny | tuned | val | 2 | 1.0000 |" in out, out
    assert "| a/r2 | tiny | tuned | val | 2 |" in out, out


def test_compare_without_reports_is_an_error(tmp_path, cli):
    code, _, err = cli("compare", tmp_path)
    assert code != 0 and "no eval_report.json" in err


def test_loss_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}]
    metrics.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = plot_losses(metrics, tmp_path / "loss.png")
    assert out is not None and out.read_bytes()[:4] == b"\x89PNG"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert plot_losses(empty, tmp_path / "none.png") is None


@pytest.mark.parametrize(
    "messages,expected",
    [
        ([("user", "hi"), ("assistant", "yo")], (1, "yo")),
        (
            [("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")],
            (4, "d"),
        ),
        ([("user", "only")], None),
    ],
)
def test_prompt_and_reference(messages, expected):
    from lorakit.contracts import Example, Message
    from lorakit.evaluation.sets import prompt_and_reference

    ex = Example(id="x", messages=tuple(Message(r, c) for r, c in messages))
    got = prompt_and_reference(ex)
    if expected is None:
        assert got is None
    else:
        assert len(got[0]) == expected[0] and got[1] == expected[1]


def test_a_metrics_file_with_a_line_cut_short_is_read_around_it(tmp_path):
    # a full disk or a killed process leaves half a line, and training carries on after it:
    # export and eval crashed on it with a JSON traceback
    from lorakit.evaluation.plot import read_curves
    from lorakit.export.contents import _last_eval
    from lorakit.rundir import RunDir

    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n\n{"step": 2, "eval_loss": 1.5}\n[1]\n'
    )
    assert read_curves(tmp_path / "metrics.jsonl") == ([(1, 2.0)], [(2, 1.5)])
    assert _last_eval(RunDir(tmp_path)) == {"step": 2, "eval_loss": 1.5}


def test_a_metrics_record_without_an_integer_step_is_left_out_of_the_plot(tmp_path):
    # "step": null crashed lorakit eval with a TypeError after the report was written
    from lorakit.evaluation.plot import read_curves

    (tmp_path / "metrics.jsonl").write_text(
        '{"step": null, "loss": 9.0}\n{"step": "2", "loss": 9.0}\n{"loss": 9.0}\n'
        '{"step": true, "eval_loss": 9.0}\n{"step": 1, "loss": 2.0}\n'
    )
    assert read_curves(tmp_path / "metrics.jsonl") == ([(1, 2.0)], [])


def test_a_metrics_record_may_hold_line_separators(tmp_path):
    """A string in a record (a note, a name) may hold U+2028 raw: the record is read whole."""
    from lorakit.rundir import metric_records

    record = {"step": 3, "eval_loss": 1.25, "note": "a\u2028b\u2029c\x85d"}
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    assert metric_records(tmp_path / "metrics.jsonl") == [record]


def test_a_metric_plugin_that_fails_is_named_not_a_traceback():
    from lorakit.errors import PluginError
    from lorakit.evaluation.scoring import _score

    class Bad:
        kind = "loss"

        def score(self, nll, n):
            return nll / 0

    with pytest.raises(
        PluginError, match=r"metric 'bad' failed to score \(ZeroDivisionError"
    ) as err:
        _score("bad", Bad(), 1.0, 1)
    assert err.value.where == "[eval].metrics"


def _strict_json(text: str):
    """JSON as every other reader takes it: the bare tokens NaN and Infinity are not JSON."""

    def refuse(token: str):
        raise AssertionError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _write_nan(folder: Path) -> None:
    metrics = build_metrics(default_catalog(), EvalSection(metrics=["eval_loss", "json_match"]))
    info = {"run": "r", "model": "tiny", "adapter": None, "config_hash": "h"}
    info |= {"data_fingerprint": "f", "baseline_key": "k"}
    nan = float("nan")
    base = [_result(["a", "b"], [True, True], {"eval_loss": nan, "json_match": float("inf")})]
    write_outputs(folder, info, [_set()], metrics, base, None, 1.0)


def test_reports_and_compare_write_nan_as_null(tmp_path, cli):
    """``nan`` (nothing scored) went out as the bare token NaN, which is not JSON."""
    _write_nan(tmp_path / "runs" / "r")
    text = (tmp_path / "runs" / "r" / "eval_report.json").read_text()
    assert _strict_json(text)["results"][0]["metrics"] == {"eval_loss": None, "json_match": None}
    code, out, err = cli("compare", tmp_path / "runs", "--json")
    assert code == 0, err
    assert _strict_json(out)[0]["metrics"] == {"eval_loss": None, "json_match": None}
    code, out, err = cli("compare", tmp_path / "runs")
    assert code == 0, err
    assert "| r | tiny | (base) | val | 2 |  |  |" in out, out


def test_compare_json_of_a_report_written_with_nan_tokens_is_json(tmp_path, cli):
    """Reports written before NaN became null are still read; compare prints null for them."""
    (tmp_path / "r").mkdir()
    report = {"run": "r", "results": [{"model": "m", "adapter": None, "split": "val"}]}
    report["results"][0]["metrics"] = {"eval_loss": float("nan"), "stops": 0.5}
    (tmp_path / "r" / "eval_report.json").write_text(json.dumps(report))
    code, out, err = cli("compare", tmp_path, "--json")
    assert code == 0, err
    assert _strict_json(out)[0]["metrics"] == {"eval_loss": None, "stops": 0.5}


def test_a_null_metric_read_back_is_nan_again(tmp_path):
    """The readers of a report (baseline reuse, sweeps, loggers) take null as they took NaN."""
    import math

    from lorakit.evaluation.canary import cached_canary
    from lorakit.evaluation.evaluate import cached_results
    from lorakit.evaluation.harness import HarnessScores, cached_harness
    from lorakit.sweep import metric_value
    from lorakit.tracking import final_metrics

    report = {
        "results": [
            {"model": "m", "adapter": None, "split": "val", "metrics": {"json_match": None}},
            {"model": "m", "adapter": None, "split": "general", "metrics": {"general_loss": None}},
            {"model": "m", "adapter": None, "split": "lm_eval/t", "metrics": {"acc": None}},
            {"model": "m", "adapter": "a", "split": "val", "metrics": {"json_match": None}},
        ],
        "canary": {"digest": "c"},
        "lm_eval": {"digest": "h", "higher_is_better": {"acc": True}},
    }
    for r in report["results"]:
        r["counts"] = {"examples": 2}
    rows = [{"id": i, "split": "val", "base": "", "base_stopped": True} for i in ("a", "b")]
    (base,) = cached_results(report, rows, [_set()])
    assert math.isnan(base.metrics["json_match"])
    assert math.isnan(cached_canary(report, "c")["general_loss"])
    harness = cached_harness(report, "h")
    assert math.isnan(harness["t"]["metrics"]["acc"])
    scores = HarnessScores(None, "0", harness, None)  # type: ignore[arg-type]
    assert scores.kinds() == ({"acc": "generation"}, {"acc": True})
    assert all(math.isnan(v) for v in final_metrics(report).values())
    assert len(final_metrics(report)) == 4
    (tmp_path / "eval_report.json").write_text(json.dumps(report))
    assert math.isnan(metric_value(tmp_path, "json_match", "val"))


def test_metrics_jsonl_writes_a_diverged_loss_as_null(tmp_path):
    from lorakit.evaluation.plot import read_curves
    from lorakit.tracking import Loggers

    loggers = Loggers(say=print)
    loggers.metrics_file = tmp_path / "metrics.jsonl"
    loggers.log_metrics(1, {"loss": 2.0, "grad_norm": float("inf")})
    loggers.log_metrics(2, {"loss": float("nan"), "grad_norm": 1.0})
    rows = [_strict_json(line) for line in loggers.metrics_file.read_text().splitlines()]
    assert [(r["loss"], r["grad_norm"]) for r in rows] == [(2.0, None), (None, 1.0)]
    assert read_curves(loggers.metrics_file) == ([(1, 2.0)], [])
