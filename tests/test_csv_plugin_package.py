"""The real third-party plugin package in examples/plugins/lorakit-csv: built and pip-installed
into a throwaway folder (never the project's venv), listed by `lorakit plugins`, its own tests
passing against the installed copy, and a recipe that uses it trained for two steps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "examples" / "plugins" / "lorakit-csv"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install --target`` of a copy of the package (a build never writes into the repo)."""
    root = tmp_path_factory.mktemp("lorakit-csv")
    source = root / "src-copy"
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
    done = subprocess.run(
        [*pip, "--no-build-isolation", "--target", str(site), str(source)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (site / "lorakit_csv.py").is_file() and list(site.glob("lorakit_csv-0.1.0.dist-info"))
    return site


def _run(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)


def test_installed_csv_plugin_is_listed(installed, tmp_path):
    done = _run([sys.executable, "-m", "lorakit.cli.main", "plugins"], installed, tmp_path)
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.split()[:2] == ["source", "csv"])
    assert "lorakit-csv 0.1.0" in row
    # Not installed in lorakit's own environment: without the folder on the path, no csv.
    bare = _run([sys.executable, "-m", "lorakit.cli.main", "plugins"], tmp_path, tmp_path)
    assert not any(line.split()[:2] == ["source", "csv"] for line in bare.stdout.splitlines())


def test_csv_plugins_own_tests_pass_against_the_installed_copy(installed, tmp_path):
    tests = tmp_path / "tests"
    shutil.copytree(PACKAGE / "tests", tests)
    done = _run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
        installed,
        tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_two_step_run_with_a_recipe_using_the_csv_plugin(installed, tmp_path, tiny_model_dir):
    rows = ["question\tanswer\tfold"]
    colors = ["red", "blue", "green", "black"]
    for i in range(24):
        fold = "val" if i % 6 == 0 else ""
        rows.append(f"What color is item {i}?\tItem {i} is {colors[i % 4]}.\t{fold}")
    (tmp_path / "qa.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "recipe.toml").write_text(
        f"""# trains the tiny test model on a TSV file read by the third-party csv plugin
[model]
plugin = "local"
path = "{tiny_model_dir}"

[[data.sources]]
plugin = "csv"
path = "qa.tsv"
prompt = "question"
response = "answer"
split = "fold"

[data]
val_fraction = 0.0
test_fraction = 0.0

[peft]
r = 4
alpha = 8

[train]
max_steps = 2
per_device_train_batch_size = 4
save_steps = 2
max_length = 64
seed = 3

[eval]
baseline = false

[output]
dir = "{tmp_path / "runs"}"
name = "csv"
""",
        encoding="utf-8",
    )
    done = _run(
        [sys.executable, "-m", "lorakit.cli.main", "run", "recipe.toml"], installed, tmp_path
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "runs" / "csv"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "adapter" / "lorakit.json").read_text())["global_step"] == 2
    train = [
        json.loads(x) for x in (run / "data" / "splits" / "train.jsonl").read_text().splitlines()
    ]
    val = [json.loads(x) for x in (run / "data" / "splits" / "val.jsonl").read_text().splitlines()]
    assert len(train) == 20 and len(val) == 4  # the fold column pinned every sixth row to val
    assert {ex["meta"]["source_plugin"] for ex in train + val} == {"csv"}
    assert train[0]["messages"][0] == {"role": "user", "content": "What color is item 1?"}
    assert "qa.tsv:3" in train[0]["meta"]["source"]
