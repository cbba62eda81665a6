"""The ``wandb`` logger, offline (no network, no account): its runs read back with wandb's own
reader of the ``.wandb`` transaction log (``wandb leet inspect``), resumed runs continued, a
failure warned about once while training goes on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_recipe
from lorakit.contracts import LogRun
from lorakit.tracking import Loggers
from lorakit_plugins.loggers.wandb import WandbLogger, WandbOptions

WANDB = Path(sys.executable).with_name("wandb")


@pytest.fixture(autouse=True)
def wandb_home(tmp_path, monkeypatch):
    """wandb's config, cache and artifact staging in the test's folder; offline by default."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def inspect(run_dir: Path, *args: str) -> str:
    """``wandb leet inspect ARGS`` on the run's one offline W&B run: wandb's own reader."""
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    done = subprocess.run(
        [str(WANDB), "leet", "inspect", *args, str(log)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def summary(run_dir: Path) -> dict:
    return json.loads(inspect(run_dir, "--summary", "--json"))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in inspect(run_dir, "--json").splitlines() if line.strip()]


def history(run_dir: Path, key: str) -> list[tuple[int, float]]:
    return [
        (int(r["history"]["step"].get("num", 0)), r["history"]["item"][key])
        for r in records(run_dir)
        if r["type"] == "history" and key in r["history"]["item"]
    ]


def log_run(tmp_path: Path, name: str = "r1", resumed: bool = False) -> LogRun:
    params = {"train": {"learning_rate": 0.0002}, "peft": {"r": 8}}
    return LogRun(name, tmp_path, tmp_path, params, "fp-1", {"torch": "2.x"}, "cfg", resumed)


@pytest.mark.slow  # wandb's offline writer and reader run as processes: about 3 s of CPU
def test_offline_run_holds_config_history_final_metrics_and_reports(tmp_path):
    said: list[str] = []
    (tmp_path / "report.md").write_text("# report\n")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 10)
    loggers = Loggers(said.append)
    loggers.open({"wandb": WandbLogger(WandbOptions(tags=["t1"]))}, log_run(tmp_path))
    loggers.log_metrics(1, {"loss": 2.5, "learning_rate": 0.0002, "grad_norm": None})
    loggers.log_metrics(2, {"loss": 2.0})
    loggers.log_metrics(2, {"eval_loss": 2.2})
    loggers.log_metrics(3, {"loss": 1.5})
    loggers.log_final(3, {"final/tuned/val/eval_loss": 1.9, "final/base/val/eval_loss": 2.4})
    loggers.log_artifacts([tmp_path / "report.md", tmp_path / "adapter"])
    loggers.close("FINISHED", timeout=120)
    assert not [m for m in said if "failed" in m], said

    got = summary(tmp_path)
    assert got["state"] == "finished" and got["exit_code"] == 0 and got["name"] == "r1"
    assert got["config"]["train"]["learning_rate"] == 0.0002
    assert got["config"]["data_fingerprint"] == "fp-1" and got["config"]["config_hash"] == "cfg"
    assert got["summary"]["final/tuned/val/eval_loss"] == 1.9
    assert got["summary"]["lorakit/status"] == "FINISHED" and got["tags"] == ["t1"]
    assert history(tmp_path, "loss") == [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert history(tmp_path, "eval_loss") == [(2, 2.2)]
    (artifact,) = [r["artifact"] for r in records(tmp_path) if r["type"] == "artifact"]
    assert artifact["type"] == "lorakit-run" and artifact["name"] == "r1-outputs"
    paths = [c["path"] for c in artifact["manifest"]["contents"]]
    assert paths == ["report.md"]  # the adapter only with log_adapter = true


def test_a_resumed_run_continues_its_wandb_run(tmp_path):
    first = WandbLogger(WandbOptions())
    first.start(log_run(tmp_path))
    first.log_metrics(1, {"loss": 3.0}, 0.0)
    first.finish("KILLED")
    run_id = (tmp_path / "wandb" / "lorakit-run-id").read_text().strip()
    again = WandbLogger(WandbOptions())
    again.start(log_run(tmp_path, resumed=True))
    again.log_metrics(2, {"loss": 2.0}, 0.0)
    again.finish("FINISHED")
    logs = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and all(p.name == f"run-{run_id}.wandb" for p in logs)


def test_a_failing_wandb_logger_warns_once_and_the_run_goes_on(tmp_path):
    said: list[str] = []
    (tmp_path / "file").write_text("not a folder")
    loggers = Loggers(said.append)
    loggers.open({"wandb": WandbLogger(WandbOptions())}, log_run(tmp_path / "file"))
    for step in range(1, 4):
        loggers.log_metrics(step, {"loss": 1.0})
    loggers.close("FINISHED", timeout=30)
    failed = [m for m in said if "logger wandb failed" in m]
    assert len(failed) == 1 and "training goes on" in failed[0], said


@pytest.mark.slow
def test_a_real_run_logs_to_wandb_what_metrics_jsonl_holds(
    tmp_path, tiny_model_dir, chat_file, cli, branch_plugins
):
    recipe = tiny_recipe(
        tmp_path, tiny_model_dir, chat_file, extra='name = "wb"\n[log]\nplugins = ["wandb"]\n'
    )
    code, _, err = cli("run", recipe, "train.eval_steps=2")
    assert code == 0, err
    assert "logger wandb failed" not in err
    run = tmp_path / "runs" / "wb"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], pytest.approx(r["loss"])) for r in rows if "loss" in r]
    evals = [(r["step"], pytest.approx(r["eval_loss"])) for r in rows if "eval_loss" in r]
    assert history(run, "loss") == losses and history(run, "eval_loss") == evals
    report = json.loads((run / "eval_report.json").read_text())
    tuned = next(r for r in report["results"] if r["adapter"])["metrics"]["eval_loss"]
    got = summary(run)
    assert got["state"] == "finished"
    assert got["summary"]["final/tuned/val/eval_loss"] == pytest.approx(tuned)
    assert got["config"]["data_fingerprint"] == report["data_fingerprint"]
