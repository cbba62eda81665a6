"""What an export leaves on disk and when it refuses (issue 25, item 4).

- Files and folders follow the user's umask like any other tool's output, so an Ollama or
  llama-server daemon running as another user can read them (``mkdtemp`` alone makes 0700).
- The model card's front matter names the base model by its Hub id, never a local cache path.
- A run whose folder is claimed by a live ``lorakit run`` (training or evaluating) is refused.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import build_tiny_model, chat_records, tiny_recipe, write_jsonl


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from lorakit.cli.main import main

    root = tmp_path_factory.mktemp("hygiene")
    model = build_tiny_model(root / "model")
    data = write_jsonl(root / "chat.jsonl", chat_records(40))
    assert main(["run", str(tiny_recipe(root, model, data))]) == 0
    return root / "runs" / "recipe"


def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        out[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return out


@pytest.mark.slow  # trains the tiny model (once per module)
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_files_and_folders_follow_the_umask(tiny_run, tmp_path, cli, umask):
    out = tmp_path / "exported"
    before = os.umask(umask)
    try:
        code, _out, err = cli("export", tiny_run, "--gguf", "--gguf-type", "f32", "--out", out)
    finally:
        os.umask(before)
    assert code == 0, err
    modes = _modes(out)
    assert {"gguf/recipe-F32.gguf", "adapter/adapter_model.safetensors", "gguf/Modelfile"} <= set(
        modes
    )
    wrong = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (0o777 if (out / name).is_dir() else 0o666) & ~umask
    }
    assert not wrong, f"modes not following umask {oct(umask)}: {wrong}"


@pytest.mark.slow  # trains the tiny model (once per module)
def test_model_card_front_matter_never_names_a_local_path(tiny_run, tmp_path, cli):
    code, _out, err = cli("export", tiny_run, "--out", tmp_path / "e")
    assert code == 0, err
    card = (tmp_path / "e" / "adapter" / "README.md").read_text()
    front = card.split("---")[1]
    # the tiny model is a local folder: it has no Hub id, so the key is left out, not a path
    assert "base_model:" not in front and str(tiny_run.parent.parent) not in front
    assert "- base model: local:" in card  # the body still says what it was


def test_model_card_front_matter_names_the_hub_id():
    from lorakit.export.model_card import render_card

    def front(meta):
        text = render_card(
            kind="gguf",
            meta=meta,
            recipe_text="",
            data_report=None,
            eval_report=None,
            last_eval=None,
            parity=None,
            merge_info=None,
        )
        return text.split("---")[1]

    cache = "/root/.cache/lorakit/smollm2-135m-instruct"
    meta = {"base_model": "embedded:SmolLM2", "base_model_path": cache}
    assert cache not in front(meta) and "base_model:" not in front(meta)
    meta["base_model_id"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert 'base_model: "HuggingFaceTB/SmolLM2-135M-Instruct"' in front(meta)
    hub = {"base_model": "hub:org/name@main", "base_model_path": "org/name"}
    assert 'base_model: "org/name"' in front(hub)  # runs exported before base_model_id existed


def test_model_sources_name_their_hub_id(monkeypatch):
    from lorakit.catalog import default_catalog

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # resolve() then checks no cache

    catalog = default_catalog()
    hub = catalog.get("model", "hub")
    ref = hub.factory(hub.options_class(id="org/model", revision="v1")).resolve()
    assert ref.hub_id == "org/model"


def test_a_busy_run_is_refused(tmp_path, cli):
    """A live `lorakit run` holds the claim; export says so and writes nothing."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from lorakit.rundir import RunDir
                r = RunDir({str(run)!r})
                r._lock(); r._write_pid()
                print("held", flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code, _out, err = cli("export", run)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    assert "in use by a running lorakit process" in err and f"pid {holder.pid}" in err
    assert "wait for it to finish" in err
    assert sorted(p.name for p in run.iterdir()) == [".lorakit-claim"]


def test_a_finished_run_claim_does_not_block(tmp_path, cli):
    """The claim file stays after a run ends (emptied, unlocked): that is not busy."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lorakit-claim").write_text("")
    code, _out, err = cli("export", run)
    assert code == 2 and "in use" not in err  # refused for what it is: not a run


def test_planted_claim_link_is_refused(tmp_path, cli):
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(tmp_path / "elsewhere", run / ".lorakit-claim")
    code, _out, err = cli("export", run)
    assert code == 2 and "symbolic link" in err
    shutil.rmtree(run)


def test_export_of_a_recipe_file_is_refused_by_name(tmp_path, cli):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[model]\nplugin = "smollm2-135m-instruct"\n')
    code, _out, err = cli("export", recipe)
    assert code == 2 and "Traceback" not in err, err  # was NotADirectoryError
    assert "not a lorakit run folder" in err and "recipe .toml" not in err, err


@pytest.mark.slow  # trains the tiny model (once per module)
def test_export_out_dot_writes_into_the_current_folder(tiny_run, tmp_path, cli, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    code, _out, err = cli("export", tiny_run, "--out", ".")
    assert code == 0, err  # was a ValueError after the whole export: '.' has no name
    assert (here / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # trains the tiny model (once per module)
def test_a_run_without_its_adapter_says_to_resume_it(tiny_run, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "adapter")  # stopped after a checkpoint, before the adapter was saved
    checkpoint = sorted((run / "checkpoints").glob("checkpoint-*"))[-1]
    for args in (("export", run), ("export", checkpoint), ("eval", run)):
        code, _out, err = cli(*args)
        assert code == 2 and "Traceback" not in err, err
        # the advice went round in circles: "or a checkpoint" / "pass the run folder"
        assert "--resume-from-checkpoint auto" in err and "train it first" not in err, err


@pytest.mark.slow  # trains the tiny model (once per module)
def test_evaluating_only_empty_splits_fails(tiny_run, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "data" / "splits" / "test.jsonl").write_text("")  # a run whose test split is empty
    code, _out, err = cli("eval", run, 'eval.splits=["test"]')
    # it said "nothing to evaluate" and exited 0, leaving an earlier report as if current
    assert code == 2 and "the test split of" in err and "holds no examples" in err, err


@pytest.mark.slow  # trains the tiny model (once per module)
def test_a_damaged_adapter_config_is_refused_not_exported(tiny_run, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = run / "adapter" / "adapter_config.json"
    config.write_text(config.read_text()[:120])  # cut short
    code, _out, err = cli("export", run, "--out", tmp_path / "e")
    # it was copied into the export, exit 0; eval and generate then failed with a traceback
    assert code == 2 and "adapter_config.json is not valid JSON" in err, err
    assert not (tmp_path / "e").exists()


@pytest.mark.slow  # trains the tiny model (once per module)
def test_a_missing_tokenizer_file_is_named(tiny_run, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "adapter" / "tokenizer.json").unlink()
    for args in (("export", run, "--out", tmp_path / "e"), ("generate", run, "--prompt", "hi")):
        code, _out, err = cli(*args)
        # was a ValueError traceback from transformers
        assert code == 2 and "tokenizer saved with the adapter" in err and "Traceback" not in err


@pytest.mark.slow  # trains the tiny model (once per module)
def test_an_export_uses_the_base_as_found_here_not_the_training_machines_path(
    tiny_run, tmp_path, cli
):
    import json

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    meta_file = run / "adapter" / "lorakit.json"
    meta = json.loads(meta_file.read_text())
    here = meta["base_model_path"]
    meta["base_model_path"] = "/home/alice/.cache/lorakit/model"  # trained on another machine
    meta_file.write_text(json.dumps(meta))
    code, _out, err = cli("export", run, "--merge", "--out", tmp_path / "e")
    assert code == 0, err
    merged = json.loads((tmp_path / "e" / "merged" / "lorakit.json").read_text())
    assert merged["base_model_path"] == here  # what `generate --compare` loads


def test_model_card_shows_a_metric_without_a_value_as_n_a():
    """Reports write NaN as null; the card said "None" for it (report.md and compare: n/a)."""
    report = {
        "results": [
            {"split": "val", "adapter": None, "metrics": {"json_match": None, "eval_loss": 1.5}},
            {"split": "val", "adapter": "a", "metrics": {"json_match": float("nan")}},
        ]
    }
    card = _card("adapter", report)
    assert "| val | base | 1.5 | n/a |" in card and "| val | fine-tuned | - | n/a |" in card
    assert "None" not in card and "nan" not in card


def test_model_card_names_a_starting_adapter_and_a_base_only_gguf():
    """A DPO run's report scores the adapter it started from too: the card called both rows
    "fine-tuned". A --base-only GGUF card said the adapter was merged into the files."""
    report = {
        "results": [
            {"split": "val", "adapter": "start", "role": "start", "metrics": {"m": 0.3}},
            {"split": "val", "adapter": "a", "metrics": {"m": 0.6}},
        ]
    }

    def card(kind, parity=None):
        return _card(kind, report, parity)

    adapter = card("adapter")
    assert "| val | starting adapter (from_adapter) | 0.3 |" in adapter
    assert "| val | fine-tuned | 0.6 |" in adapter
    assert "lorakit generate <run folder>" in adapter and "<this folder> --prompt" not in adapter
    measured = {
        "reference": "r",
        "probes": "p",
        "n_tokens": 1,
        "n_supervised_tokens": 1,
        "reference_ppl": 1.0,
        "comparisons": {},
    }
    base = {**measured, "merge_base": "dequantized bnb-4bit (fp32)", "base_only": True}
    gguf = card("gguf", base)
    assert "without the adapter" in gguf and "adapter merged" not in gguf
    merged = card("gguf", {**measured, "merge_base": "original (fp32)"})
    assert "GGUF merge: adapter merged into the **original (fp32)** base" in merged


def _card(kind: str, eval_report: dict, parity: dict | None = None) -> str:
    """The model card of a run with only ``eval_report`` (and ``parity``) to show."""
    from lorakit.export.model_card import render_card

    return render_card(
        kind=kind,
        meta={"base_model": "x"},
        recipe_text="",
        data_report=None,
        eval_report=eval_report,
        last_eval=None,
        parity=parity,
        merge_info=None,
    )
