"""Experiment loggers ([log] plugins): validation, the fan-out's failure rule, and real runs
read back with TensorBoard's event reader and the MLflow client."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import attrs
import pytest
from helpers import chat_records, tiny_recipe, write_jsonl, write_recipe
from lorakit.contracts import LogRun
from lorakit.errors import RecipeError
from lorakit.recipe import load_recipe
from lorakit.tracking import Loggers

CHAT = """
[[data.sources]]
plugin = "chat_jsonl"
path = "chat.jsonl"
"""


def _problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "r.toml"
    path.write_text(CHAT + text, encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return info.value.problems


def test_log_section_is_validated_with_suggestions(tmp_path):
    found = _problems(
        tmp_path,
        '[log]\nplugins = ["tensorbord", "mlflow"]\n'
        '[log.options.mlflow]\ntracking_url = "http://x"\n'
        '[log.options.wandb]\nproject = "p"\n',
    )
    text = "\n".join(found)
    assert "[log].plugins[0]: unknown logger \"tensorbord\"; did you mean 'tensorboard'?" in text
    assert "[log.options.mlflow].tracking_url" in text and "tracking_uri" in text
    assert "[log.options.wandb]: 'wandb' is not in [log].plugins" in text
    assert "unknown section" in "\n".join(_problems(tmp_path, "[logs]\nplugins = []\n"))


def test_a_logger_whose_package_is_missing_is_refused(tmp_path):
    from lorakit import hookimpl
    from lorakit.catalog import build_catalog, make_manager

    class Needy:
        Options = attrs.make_class("NeedyOptions", {})
        requires: ClassVar[dict[str, str]] = {"no_such_module_xyz": "pip install needy"}

    plugin = SimpleNamespace(
        lorakit_register_loggers=hookimpl(lambda register: register("needy", Needy))
    )
    catalog = build_catalog(make_manager([plugin]))
    path = tmp_path / "r.toml"
    path.write_text(CHAT + '[log]\nplugins = ["needy"]\n', encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, catalog=catalog)
    assert info.value.problems == [
        "[log].plugins[0]: logger \"needy\" needs the Python package 'no_such_module_xyz', "
        "which is not installed; pip install needy"
    ]


class _Record:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def start(self, run):
        self.calls.append("start")

    def log_metrics(self, step, metrics, wall_time):
        self.calls.append(f"metrics {step}")

    def log_final(self, step, metrics):
        self.calls.append("final")

    def log_artifacts(self, paths):
        self.calls.append("artifacts")

    def finish(self, status):
        self.calls.append(status)


class _Broken(_Record):
    def log_metrics(self, step, metrics, wall_time):
        raise OSError(28, "No space left on device")


class _Stuck(_Record):
    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def log_metrics(self, step, metrics, wall_time):
        self.release.wait()  # a tracker that never answers


def test_a_failing_logger_warns_once_and_a_stuck_one_blocks_nothing(tmp_path):
    said: list[str] = []
    good, broken, stuck = _Record(), _Broken(), _Stuck()
    loggers = Loggers(said.append)
    run = LogRun("r", tmp_path, tmp_path, {}, "fp", {}, "hash")
    loggers.open({"good": good, "broken": broken, "stuck": stuck}, run)
    for step in range(1, 6):
        loggers.log_metrics(step, {"loss": 1.0})  # returns at once although "stuck" hangs
    loggers.flush("good", timeout=10)  # waits for that one logger only
    assert good.calls[-1] == "metrics 5"
    loggers.close("FINISHED", timeout=0.5)
    assert good.calls == ["start", *(f"metrics {s}" for s in range(1, 6)), "FINISHED"]
    assert broken.calls == ["start"]
    failed = [m for m in said if "logger broken failed" in m]
    assert len(failed) == 1 and "No space left on device" in failed[0], said
    assert any("logger stuck did not finish" in m for m in said), said
    stuck.release.set()


def test_the_core_writes_metrics_jsonl_itself_and_loggers_mirror_it(tmp_path):
    """metrics.jsonl is the core's (loss.png, export and compare read it): written with no
    logger at all, complete the moment log_metrics returns; a logger gets the same records."""
    said: list[str] = []
    loggers = Loggers(said.append)
    loggers.open({}, LogRun("r", tmp_path, tmp_path, {}, "fp", {}, "hash"))
    loggers.log_metrics(1, {"loss": 2.5, "epoch": 0.5})
    loggers.log_metrics(2, {"eval_loss": 2.0})
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rows] == [
        (1, 2.5, None),
        (2, None, 2.0),
    ]
    assert list(rows[0]) == ["step", "epoch", "time", "loss"]

    mirror = _Record()
    with_logger = Loggers(said.append)
    (tmp_path / "b").mkdir()
    with_logger.open({"m": mirror}, LogRun("r", tmp_path / "b", tmp_path, {}, "fp", {}, "h"))
    with_logger.log_metrics(3, {"loss": 1.0})
    with_logger.close("FINISHED", timeout=5)
    assert mirror.calls == ["start", "metrics 3", "FINISHED"]
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("planted", ["folder", "link"])
def test_a_metrics_file_that_cannot_be_written_is_said_once_and_training_goes_on(tmp_path, planted):
    said: list[str] = []
    loggers = Loggers(said.append)
    outside = tmp_path / "outside.txt"
    outside.write_text("mine\n")
    run = tmp_path / "run"
    run.mkdir()
    if planted == "folder":
        (run / "metrics.jsonl").mkdir()  # open fails: IsADirectoryError
    else:
        (run / "metrics.jsonl").symlink_to(outside)  # never appended through: O_NOFOLLOW
    loggers.open({}, LogRun("r", run, tmp_path, {}, "fp", {}, "hash"))
    for step in range(3):
        loggers.log_metrics(step, {"loss": 1.0})
    assert len(said) == 1 and "cannot write" in said[0] and "training goes on" in said[0]
    assert outside.read_text() == "mine\n"


@pytest.mark.slow
def test_tensorboard_and_mlflow_match_metrics_jsonl(tmp_path, tiny_model_dir, chat_file, cli):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        chat_file,
        extra='name = "tracked"\n[log]\nplugins = ["tensorboard", "mlflow"]\n',
    )
    code, out, err = cli("run", recipe, "train.eval_steps=2")
    assert code == 0, err
    assert "\r" not in err, "progress bars must stay out of captured output"
    # one readable line per logged step instead of transformers' dict of strings
    assert "{'loss'" not in out + err
    assert re.search(r"\[lorakit\] step 2/\d+: loss \d+\.\d{4}, lr [\d.e-]+, grad_norm", err), err
    assert re.search(r"\[lorakit\] step 2/\d+: eval_loss \d+\.\d{4}", err), err
    run = tmp_path / "runs" / "tracked"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert len(losses) == 4 and len(evals) == 2
    report = json.loads((run / "eval_report.json").read_text())
    tuned = next(r for r in report["results"] if r["adapter"])["metrics"]["eval_loss"]
    base = next(r for r in report["results"] if not r["adapter"])["metrics"]["eval_loss"]

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")] == losses
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("eval_loss")] == evals
    assert events.Scalars("final/tuned/val/eval_loss")[0].value == pytest.approx(tuned)
    assert "final/base/val/eval_loss" in scalars and "learning_rate" in scalars
    assert "recipe" in "".join(events.Tags()["tensors"])

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow' / 'mlflow.db'}")
    (found,) = client.search_runs(
        [client.get_experiment_by_name("lorakit").experiment_id], "attributes.run_name = 'tracked'"
    )
    rid = found.info.run_id
    assert found.info.status == "FINISHED"
    history = [(m.step, m.value) for m in client.get_metric_history(rid, "loss")]
    assert sorted(history) == [(s, pytest.approx(v)) for s, v in losses]
    assert sorted((m.step, m.value) for m in client.get_metric_history(rid, "eval_loss")) == [
        (s, pytest.approx(v)) for s, v in evals
    ]
    assert found.data.metrics["final/tuned/val/eval_loss"] == pytest.approx(tuned)
    assert found.data.metrics["final/base/val/eval_loss"] == pytest.approx(base)
    params = found.data.params
    resolved = json.loads((run / "resolved.json").read_text())
    assert params["train.learning_rate"] == str(resolved["train"]["learning_rate"])
    assert params["data_fingerprint"] == report["data_fingerprint"]
    assert params["version.torch"] == json.loads((run / "versions.json").read_text())["torch"]
    stored = {a.path for a in client.list_artifacts(rid)}
    assert {"adapter", "eval_report.json", "report.md", "loss.png"} <= stored
    adapter_files = {Path(a.path).name for a in client.list_artifacts(rid, "adapter")}
    assert "adapter_model.safetensors" in adapter_files
    # the artifact store's copy of eval_report.json is not a second run for `compare`
    code, out, err = cli("compare", tmp_path / "runs", "--json")
    assert code == 0, err
    rows = [(r["split"], r["adapter"] is None) for r in json.loads(out)]
    assert sorted(rows) == [("general", False), ("general", True), ("val", False), ("val", True)]
    assert found.data.metrics["final/tuned/general/general_loss"] > 0  # the canary, logged too


@pytest.mark.slow
def test_broken_loggers_warn_once_and_the_run_completes(tmp_path, tiny_model_dir, chat_file, cli):
    # data_report.json is written before the loggers start: a file where the event folder goes
    recipe = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        chat_file,
        extra='name = "broken"\n[log]\nplugins = ["tensorboard", "mlflow"]\n'
        '[log.options.tensorboard]\ndir = "data_report.json/tb"\n'
        '[log.options.mlflow]\ntracking_uri = "http://127.0.0.1:9"\ntimeout_s = 2\n',
    )
    code, _out, err = cli("run", recipe, "train.max_steps=2", "eval.baseline=false")
    assert code == 0, err
    assert err.count("logger tensorboard failed") == 1, err
    assert err.count("logger mlflow failed") == 1, err
    assert "Traceback" not in err and "\r" not in err
    run = tmp_path / "runs" / "broken"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in rows) == 2


def test_progress_bars_only_on_a_terminal(monkeypatch, capsys):
    import io

    from lorakit import progress

    monkeypatch.delenv("LORAKIT_PROGRESS", raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a log file: not a terminal
    assert not progress.enabled()
    assert list(progress.bar(range(3), desc="quiet")) == [0, 1, 2]
    assert "\r" not in progress.sys.stderr.getvalue()
    monkeypatch.setenv("LORAKIT_PROGRESS", "1")  # forced on
    assert progress.enabled()
    list(progress.bar(range(3), desc="loud"))
    assert "loud" in progress.sys.stderr.getvalue()


def test_the_tensorboard_folder_stays_inside_the_run(tmp_path, cli):
    """log.options.tensorboard.dir may not climb out of the run folder."""
    pytest.importorskip("tensorboard")
    write_jsonl(tmp_path / "c.jsonl", chat_records(10))
    recipe = write_recipe(
        tmp_path, [{"plugin": "chat_jsonl", "path": "c.jsonl"}], log={"plugins": ["tensorboard"]}
    )
    for bad in ("../../x", "/tmp/x", "~/x"):
        code, _, err = cli("check", recipe, f'log.options.tensorboard.dir="{bad}"')
        assert code == 2 and "[log.options.tensorboard].dir" in err and "inside the run" in err, err
    code, _, err = cli("check", recipe, 'log.options.tensorboard.dir="tb/here"')
    assert code == 0, err


def test_an_mlflow_run_resumes_in_a_folder_whose_path_holds_a_quote(tmp_path):
    """The resumed run was searched with the folder's path inside a quoted filter string: an
    apostrophe in it (o'brien) broke MLflow's parser and the logger."""
    pytest.importorskip("mlflow")
    from lorakit.contracts import LogRun
    from lorakit_plugins.loggers.mlflow import MlflowLogger, MlflowOptions

    out = tmp_path / "o'brien" / "runs"
    (out / "r1").mkdir(parents=True)
    run = LogRun(
        name="r1",
        run_dir=out / "r1",
        output_dir=out,
        params={"train": {"lr": 1}},
        data_fingerprint="x",
        versions={},
        config_hash="h",
        resumed=False,
    )
    first = MlflowLogger(MlflowOptions())
    first.start(run)
    first.finish("FINISHED")
    again = MlflowLogger(MlflowOptions())
    again.start(attrs.evolve(run, resumed=True))
    assert again.run_id == first.run_id
    again.finish("FINISHED")


def test_a_resumed_runs_tensorboard_shows_each_step_once(tmp_path):
    """A resume trains and logs again the steps after its checkpoint, which the interrupted
    attempt had logged too: TensorBoard showed them twice (metrics.jsonl did not)."""
    pytest.importorskip("tensorboard")
    from lorakit.contracts import LogRun
    from lorakit_plugins.loggers.tensorboard import TensorBoardLogger, TensorBoardOptions
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = LogRun("r", tmp_path, tmp_path, {}, "fp", {}, "hash")
    first = TensorBoardLogger(TensorBoardOptions())
    first.start(run)
    for step in range(1, 7):  # killed after step 6; the last checkpoint was step 4
        first.log_metrics(step, {"loss": float(step)}, 0.0)
    first.finish("KILLED")
    again = TensorBoardLogger(TensorBoardOptions())
    again.start(attrs.evolve(run, resumed=True, resumed_from=4))
    for step in (5, 6, 7):
        again.log_metrics(step, {"loss": 10.0 + step}, 0.0)
    again.finish("FINISHED")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert loss == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 15.0), (6, 16.0), (7, 17.0)]
