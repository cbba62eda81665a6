"""``lorakit doctor`` (issue 24): a 3-step micro-run on the embedded model against the golden
record shipped for this lorakit version; a drift names the packages whose versions changed.
And a resume on another training stack says what changed."""

from __future__ import annotations

import copy
import json
import sys

import pytest
from helpers import chat_records, tiny_recipe, write_jsonl
from lorakit import __version__, doctor
from lorakit.rundir import stack_versions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


SHIPPED = doctor.golden_for()


def golden() -> dict:
    return json.loads(SHIPPED.read_text(encoding="utf-8"))


def test_the_golden_record_of_this_version_is_shipped():
    path = doctor.golden_for()
    assert path.name == f"doctor-{__version__}.json"
    record = golden()
    assert [s["step"] for s in record["steps"]] == list(range(1, doctor.STEPS + 1))
    assert record["probe_text"] == doctor.PROBE_TEXT and record["probe_ids"]
    assert len(record["chat_ids"]) == len(record["chat_labels"]) > 0
    assert set(record["versions"]) == set(stack_versions())
    # and a wheel carries it
    pyproject = tomllib.loads((doctor.GOLDEN_DIR.parents[2] / "pyproject.toml").read_text())
    assert "golden/*.json" in pyproject["tool"]["setuptools"]["package-data"]["lorakit"]


def drifted(record: dict) -> dict:
    """``record`` as a stack that scales the loss by 1/accumulation would train it (TRL 1.7),
    under another transformers."""
    out = copy.deepcopy(record)
    for step in out["steps"]:
        step["loss"] *= 0.5
    out["versions"]["transformers"] = "4.57.1"
    return out


def test_compare_names_what_moved_and_the_packages_that_changed():
    record = golden()
    assert doctor.compare(record, record, SHIPPED).ok
    verdict = doctor.compare(drifted(record), record, SHIPPED)
    assert not verdict.ok
    assert len(verdict.problems) == doctor.STEPS
    assert all("loss" in p and "tolerance 0.0001" in p for p in verdict.problems)
    installed = record["versions"]["transformers"]
    assert verdict.changed_versions == {"transformers": (installed, "4.57.1")}


def test_kernel_rounding_passes_and_token_ids_must_be_exact():
    record, mine = golden(), golden()
    for step in mine["steps"]:  # what 2 threads instead of 1 did: ~1e-6 relative
        step["loss"] *= 1 + 2e-6
        step["grad_norm"] *= 1 - 2e-6
    mine["adapter_sha256"] = "0" * 64
    verdict = doctor.compare(mine, record, SHIPPED)
    assert verdict.ok, verdict.problems
    assert any("sha256" in n and "information only" in n for n in verdict.notes)
    mine["chat_ids"] = [*mine["chat_ids"][:3], 0, *mine["chat_ids"][4:]]
    (problem,) = doctor.compare(mine, record, SHIPPED).problems
    assert "rendered conversation" in problem and "position 3" in problem


def test_doctor_cli_reports_drift_and_the_changed_package(tmp_path, monkeypatch, cli):
    monkeypatch.setattr(doctor, "GOLDEN_DIR", tmp_path)
    (tmp_path / f"doctor-{__version__}.json").write_text(json.dumps(golden()))
    monkeypatch.setattr(doctor, "micro_run", lambda log=None: drifted(golden()))
    code, out, _ = cli("doctor")
    assert code == 1, out
    assert "DRIFT" in out and "step 1 loss" in out
    assert "transformers: " in out and "-> 4.57.1" in out
    monkeypatch.setattr(doctor, "micro_run", lambda log=None: golden())
    code, out, _ = cli("doctor")
    assert code == 0 and "ok: " in out, out


def test_doctor_cli_writes_a_golden_record_and_uses_the_newest_one(tmp_path, monkeypatch, cli):
    monkeypatch.setattr(doctor, "GOLDEN_DIR", tmp_path)
    code, _, err = cli("doctor")
    assert code == 2 and "no golden record" in err and "--write-golden" in err
    older = {**golden(), "lorakit": "0.0.9"}
    monkeypatch.setattr(doctor, "micro_run", lambda log=None: older)
    assert cli("doctor", "--write-golden")[0] == 0
    assert (tmp_path / "doctor-0.0.9.json").is_file()
    monkeypatch.setattr(doctor, "micro_run", lambda log=None: golden())
    code, out, _ = cli("doctor")
    assert code == 0 and "no golden record for lorakit" in out and "doctor-0.0.9.json" in out


def test_doctor_json_prints_one_json_document_and_the_lines_on_stderr(tmp_path, monkeypatch, cli):
    """With --json the step lines and the verdict went to stdout after the record: not JSON."""
    monkeypatch.setattr(doctor, "GOLDEN_DIR", tmp_path)
    (tmp_path / f"doctor-{__version__}.json").write_text(json.dumps(golden()))
    monkeypatch.setattr(doctor, "micro_run", lambda log=None: drifted(golden()))
    code, out, err = cli("doctor", "--json")
    assert code == 1
    data = json.loads(out)
    assert data["steps"] == drifted(golden())["steps"]
    verdict = data["verdict"]
    assert verdict["ok"] is False and verdict["golden"] == f"doctor-{__version__}.json"
    assert len(verdict["problems"]) == doctor.STEPS
    installed = golden()["versions"]["transformers"]
    assert verdict["changed_versions"] == {
        "transformers": {"recorded": installed, "installed": "4.57.1"}
    }
    assert "DRIFT" in err and "step 1 loss" in err
    monkeypatch.setattr(doctor, "micro_run", lambda log=None: golden())
    code, out, err = cli("doctor", "--json")
    assert code == 0 and json.loads(out)["verdict"]["ok"] is True and "ok: " in err
    monkeypatch.setattr(doctor, "micro_run", lambda log=None: {**golden(), "lorakit": "0.0.8"})
    code, out, _ = cli("doctor", "--json", "--write-golden")
    assert code == 0 and json.loads(out)["golden_written"] == str(tmp_path / "doctor-0.0.8.json")


@pytest.mark.slow
@pytest.mark.embedded
def test_the_micro_run_on_this_stack_matches_the_golden_record():
    record = doctor.micro_run()
    verdict = doctor.compare(record, golden(), SHIPPED)
    assert verdict.ok, (
        f"{verdict.problems}; changed packages: {verdict.changed_versions}. If the change is "
        "understood and wanted, record it: lorakit doctor --write-golden"
    )


@pytest.mark.slow
def test_a_resume_on_another_training_stack_says_what_changed(tmp_path, tiny_model_dir, cli):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(16))
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data, extra="")
    assert cli("run", recipe, "train.max_steps=2", "train.lr_scheduler_type=constant")[0] == 0
    run = tmp_path / "runs" / "recipe"
    versions = json.loads((run / "versions.json").read_text())
    installed = versions["transformers"]
    versions["transformers"] = "4.57.1"  # the run started under another transformers
    (run / "versions.json").write_text(json.dumps(versions))
    code, _, err = cli(
        "run",
        recipe,
        "train.max_steps=4",
        "train.lr_scheduler_type=constant",
        "--resume-from-checkpoint",
        "auto",
    )
    assert code == 0, err
    assert f"transformers 4.57.1 -> {installed}" in err and "training stack changed" in err
    resumed = json.loads((run / "run.json").read_text())["history"][-1]
    assert resumed["versions_changed"] == {"transformers": ["4.57.1", installed]}
