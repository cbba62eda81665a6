"""Real training runs on a tiny Llama (real PEFT, TRL, bitsandbytes): outputs, determinism,
resume, and run-folder safety."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import chat_records, resume_split_run, run_adapter, tiny_recipe, write_jsonl

pytestmark = pytest.mark.slow


def losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_run_writes_a_complete_run_folder(tmp_path, tiny_model_dir, chat_file, cli):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "first"')
    code, _out, err = cli("run", recipe, "train.max_steps=6", "train.save_steps=3")
    assert code == 0, err
    run = tmp_path / "runs" / "first"
    assert (run / "recipe.toml").read_text() == recipe.read_text(), "the recipe is kept as given"
    resolved = json.loads((run / "resolved.json").read_text())
    assert resolved["train"]["max_steps"] == 6 and resolved["peft"]["r"] == 4
    versions = json.loads((run / "versions.json").read_text())
    assert versions["torch"] and versions["peft"] and versions["trl"]
    report = json.loads((run / "data_report.json").read_text())
    assert sum(report["counts"].values()) == 40
    assert {p.name for p in (run / "data" / "splits").iterdir()} == {
        "train.jsonl",
        "val.jsonl",
        "test.jsonl",
    }
    adapter = run / "adapter"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ):
        assert (adapter / name).is_file(), name
    assert json.loads((adapter / "generation_config.json").read_text())["eos_token_id"] in (2, [2])
    tensors = run_adapter(run)
    b = [t for k, t in tensors.items() if "lora_B" in k]
    assert b and any(t.abs().sum() > 0 for t in b), "lora_B must have moved from zero"
    steps = losses(run)
    assert len(steps) >= 6 and steps[-1] < steps[0], steps
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-3", "checkpoint-6"]
    assert all((run / "checkpoints" / c / "LORAKIT_COMPLETE").is_file() for c in ckpts)


@pytest.mark.all_cores
def test_same_seed_gives_identical_adapters(
    tmp_path, tiny_model_dir, chat_file, cli, compute_dtype
):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, dtype=compute_dtype)
    for name in ("a", "b"):
        code, _, err = cli("run", recipe, f"output.name={name}")
        assert code == 0, err
    a, b = (run_adapter(tmp_path / "runs" / n) for n in ("a", "b"))
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a)
    code, _, err = cli("run", recipe, "output.name=c", "train.seed=8")
    c = run_adapter(tmp_path / "runs" / "c")
    assert any(not a[k].equal(c[k]) for k in a), "a different seed must change the adapter"


@pytest.mark.all_cores
def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir, chat_file, cli, compute_dtype):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, dtype=compute_dtype)
    common = ['train.lr_scheduler_type="constant"', "train.save_steps=2"]
    code, _, err = cli("run", recipe, "output.name=full", "train.max_steps=4", *common)
    assert code == 0, err
    split = resume_split_run(cli, recipe, tmp_path / "runs", common)
    full = run_adapter(tmp_path / "runs" / "full")
    assert all(full[k].equal(split[k]) for k in full), (
        "resumed adapter differs from uninterrupted run"
    )
    info = json.loads((tmp_path / "runs" / "split" / "run.json").read_text())
    assert [e["event"] for e in info["history"]] == ["start", "resume"]


def test_existing_run_is_never_overwritten(tmp_path, tiny_model_dir, chat_file, cli):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "keep"')
    assert cli("run", recipe, "train.max_steps=2")[0] == 0
    before = (tmp_path / "runs" / "keep" / "adapter" / "adapter_model.safetensors").read_bytes()
    code, _, err = cli("run", recipe, "train.max_steps=2")
    assert code == 2 and "already holds a run" in err and "output.name=keep-2" in err
    assert "Traceback" not in err
    after = (tmp_path / "runs" / "keep" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert before == after


def test_auto_resume_ignores_incomplete_checkpoint(tmp_path, tiny_model_dir, chat_file, cli):
    from lorakit.rundir import RunDir

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "r"')
    assert cli("run", recipe, "train.max_steps=2", "train.save_steps=1")[0] == 0
    run = RunDir(tmp_path / "runs" / "r")
    partial = run.checkpoints / "checkpoint-9"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"half a file")
    skipped: list = []
    chosen = run.resolve_checkpoint("auto", on_skip=lambda c, why: skipped.append((c.name, why)))
    assert chosen.name == "checkpoint-2"
    assert skipped == [("checkpoint-9", "no LORAKIT_COMPLETE marker (its save was interrupted)")]
    code, _, err = cli("run", recipe, "--resume-from-checkpoint", str(partial))
    assert code == 2 and "incomplete" in err


def test_resume_without_a_run_is_a_clear_error(tmp_path, tiny_model_dir, chat_file, cli):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "none"')
    code, _, err = cli("run", recipe, "--resume-from-checkpoint", "auto")
    assert code == 2 and "nothing to resume" in err


def test_qlora_4bit_trains_on_cpu(tmp_path, tiny_model_dir, chat_file, cli, compute_dtype):
    recipe = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        chat_file,
        quant="bnb-4bit",
        extra='name = "q"',
        dtype=compute_dtype,
    )
    code, _, err = cli("run", recipe)
    assert code == 0, err
    expected = {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[compute_dtype]
    assert "quant bnb-4bit" in err and f"compute {expected}" in err
    meta = json.loads((tmp_path / "runs/q/adapter/lorakit.json").read_text())
    assert meta["compute_dtype"] == compute_dtype, "eval/export load the run in this dtype"
    tensors = run_adapter(tmp_path / "runs" / "q")
    # the adapter and its optimizer state stay fp32 whatever the base computes in
    assert all(str(t.dtype) == "torch.float32" for t in tensors.values()), "fp32 adapter on CPU"
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in tensors.items())
    steps = losses(tmp_path / "runs" / "q")
    assert steps[-1] < steps[0]


def test_unknown_local_model_folder(tmp_path, chat_file, cli):
    recipe = tiny_recipe(tmp_path, tmp_path / "missing-model", chat_file)
    code, _, err = cli("run", recipe)
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_hub_model_offline_is_a_clear_error(tmp_path, chat_file, cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = tmp_path / "hub.toml"
    recipe.write_text(
        f'[model]\nplugin = "hub"\nid = "someorg/not-a-model"\n'
        f'[[data.sources]]\nplugin = "chat_jsonl"\npath = "{chat_file}"\n'
        f'[output]\ndir = "{tmp_path / "runs"}"\n'
    )
    code, _, err = cli("run", recipe)
    assert code == 2 and "someorg/not-a-model" in err and "HF_HUB_OFFLINE" in err


@pytest.mark.all_cores
@pytest.mark.parametrize("quant", ["bnb-4bit", "bnb-8bit", "none"])
def test_mid_training_eval_leaves_training_unchanged(
    tmp_path, tiny_model_dir, cli, quant, compute_dtype
):
    """Evaluating every 2 steps gives the same adapter as not evaluating (QLoRA, dropout on).

    Guards two ways evaluation leaked into training: bitsandbytes repacking 4-bit layers for
    inference on AVX512-BF16 CPUs (no backward after the first eval), and the eval dataloader
    drawing from the global RNG (different dropout masks afterwards).
    """

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(60))
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data, quant=quant, dtype=compute_dtype)
    common = (
        "train.max_steps=6",
        "train.save_steps=6",
        'eval.metrics=["eval_loss"]',
        "eval.baseline=false",
    )
    for name, extra in (("plain", ()), ("evaluated", ("train.eval_steps=2",))):
        code, _, err = cli("run", recipe, f"output.name={name}", *common, *extra)
        assert code == 0, err
    rows = [
        json.loads(x) for x in (tmp_path / "runs/evaluated/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 6]
    assert losses(tmp_path / "runs/plain") == losses(tmp_path / "runs/evaluated")
    a, b = (run_adapter(tmp_path / "runs" / n) for n in ("plain", "evaluated"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_resuming_a_finished_run_trains_nothing(tmp_path, tiny_model_dir, chat_file, cli):
    """A run stopped after its last step (while saving the adapter or evaluating) resumes by
    finishing what is missing: no step past max_steps, the adapter of the last checkpoint."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "done"')
    common = (
        "train.max_steps=2",
        "train.save_steps=2",
        'eval.metrics=["eval_loss"]',
        'train.lr_scheduler_type="constant"',  # a schedule that may be extended
    )
    assert cli("run", recipe, *common)[0] == 0
    run = tmp_path / "runs" / "done"
    first = run_adapter(run)
    (run / "adapter" / "adapter_model.safetensors").unlink()  # as if killed while saving
    code, _, err = cli("run", recipe, *common, "--resume-from-checkpoint", "auto")
    assert code == 0, err
    assert "not training" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert json.loads((run / "adapter" / "lorakit.json").read_text())["global_step"] == 2
    again = run_adapter(run)
    assert first.keys() == again.keys() and all(first[k].equal(again[k]) for k in first)
    # extending a finished run is still training: max_steps 3 trains one more step
    code, _, err = cli(
        "run", recipe, "train.max_steps=3", *common[1:], "--resume-from-checkpoint", "auto"
    )
    assert code == 0, err
    assert json.loads((run / "adapter" / "lorakit.json").read_text())["global_step"] == 3


def test_a_diverging_loss_stops_with_a_clear_error(tmp_path, tiny_model_dir, chat_file, cli):
    """A loss that turns NaN/Inf stops the run (exit 2, no traceback): the checkpoints written
    before stay, and no adapter is saved from the diverged weights."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "boom"')
    code, _, err = cli(
        "run",
        recipe,
        "train.learning_rate=1e30",
        'train.lr_scheduler_type="constant"',
        "train.max_grad_norm=1e30",
        "train.max_steps=6",
        "train.save_steps=1",
    )
    assert code == 2, err
    assert "NaN or Inf" in err and "learning_rate" in err and "Traceback" not in err
    run = tmp_path / "runs" / "boom"
    assert (run / "checkpoints" / "checkpoint-1" / "LORAKIT_COMPLETE").is_file()
    assert not (run / "adapter").exists()


def test_auto_resume_skips_a_damaged_checkpoint_and_says_why(
    tmp_path, tiny_model_dir, chat_file, cli
):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "hurt"')
    common = (
        "train.save_steps=1",
        'eval.metrics=["eval_loss"]',
        'train.lr_scheduler_type="constant"',
    )
    assert cli("run", recipe, "train.max_steps=3", *common)[0] == 0
    ckpts = tmp_path / "runs" / "hurt" / "checkpoints"
    optimizer = ckpts / "checkpoint-3" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # a kill while torch.save wrote it
    code, _, err = cli(
        "run",
        recipe,
        "train.max_steps=4",
        *common,
        "--resume-from-checkpoint",
        str(ckpts / "checkpoint-3"),
    )
    assert code == 2 and "damaged" in err and "optimizer.pt" in err and "Traceback" not in err
    code, _, err = cli(
        "run", recipe, "train.max_steps=4", *common, "--resume-from-checkpoint", "auto"
    )
    assert code == 0, err
    assert "skipping checkpoint-3: optimizer.pt" in err and "from checkpoint-2" in err
    assert (ckpts / "checkpoint-4" / "LORAKIT_COMPLETE").is_file()


def test_safetensors_truncation_is_found_without_loading(tmp_path):
    import torch
    from lorakit.checkpoints import safetensors_problem
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(100), "b": torch.zeros(3, 3)}, str(path))
    assert safetensors_problem(path) is None
    path.write_bytes(path.read_bytes()[:-10])
    assert "truncated" in safetensors_problem(path)
    path.write_bytes(b"\x05")
    assert "header" in safetensors_problem(path)
    assert safetensors_problem(tmp_path / "none.safetensors") == "missing"


def test_a_failed_start_writes_nothing_or_may_be_restarted(tmp_path, tiny_model_dir, cli):

    data = tmp_path / "chat.jsonl"
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data, extra='name = "first-try"')
    run = tmp_path / "runs" / "first-try"
    # bad data: the folder is never claimed
    code, _, err = cli("run", recipe, "train.max_steps=1")
    assert code == 2 and "Traceback" not in err
    assert not run.exists()
    # a failure after the claim but before step 1: named modules that do not exist
    write_jsonl(data, chat_records(40))
    code, _, err = cli("run", recipe, "train.max_steps=1", 'peft.target_modules=["nope"]')
    assert code == 2 and "target_modules" in err and "q_proj" in err and "Traceback" not in err
    assert (run / "run.json").is_file() and not (run / "metrics.jsonl").exists()
    # the corrected recipe restarts it, says so, and keeps the earlier attempt in the history
    code, _, err = cli("run", recipe, "train.max_steps=1")
    assert code == 0, err
    assert "started again" in err
    events = [e["event"] for e in json.loads((run / "run.json").read_text())["history"]]
    assert events == ["start", "stopped before a checkpoint", "restart"]
    # a run that trained is never restarted
    code, _, err = cli("run", recipe, "train.max_steps=1")
    assert code == 2 and "already holds a run" in err


def test_two_runs_started_together_one_claims_the_folder(tmp_path, tiny_model_dir, chat_file):
    import os
    import subprocess
    import sys

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "race"')
    cmd = [sys.executable, "-m", "lorakit.cli.main", "run", str(recipe), "train.max_steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "in use by another lorakit process" in loser or "already holds a run" in loser
    assert "Traceback" not in loser
    history = json.loads((tmp_path / "runs" / "race" / "run.json").read_text())["history"]
    assert [e["event"] for e in history] == ["start"]


def test_resume_refuses_changed_settings_and_records_safe_ones(
    tmp_path, tiny_model_dir, chat_file, cli
):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "same"')
    common = (
        "train.save_steps=2",
        'eval.metrics=["eval_loss"]',
        'train.lr_scheduler_type="constant"',
    )
    assert cli("run", recipe, "train.max_steps=2", *common)[0] == 0
    for change, key in (("train.learning_rate=0.1", "train.learning_rate"), ("peft.r=8", "peft.r")):
        code, _, err = cli(
            "run", recipe, "train.max_steps=4", change, *common, "--resume-from-checkpoint", "auto"
        )
        assert code == 2 and key in err and "Traceback" not in err, err
    data = chat_file.read_text().splitlines()
    chat_file.write_text("\n".join(data[1:]) + "\n")  # the data changed under the run
    code, _, err = cli(
        "run", recipe, "train.max_steps=4", *common, "--resume-from-checkpoint", "auto"
    )
    assert code == 2 and "data changed" in err
    chat_file.write_text("\n".join(data) + "\n")
    code, _, err = cli(
        "run", recipe, "train.max_steps=4", *common, "--resume-from-checkpoint", "auto"
    )
    assert code == 0, err
    assert "started computing in" not in err  # the same dtype: nothing to say
    last = json.loads((tmp_path / "runs" / "same" / "run.json").read_text())["history"][-1]
    assert last["event"] == "resume" and last["changed"] == {"train.max_steps": [2, 4]}


def test_a_resume_in_another_compute_dtype_says_so(tmp_path, tiny_model_dir, chat_file, cli):
    """``quant.dtype = "auto"`` is bf16 on a CPU with fast bf16 and fp32 elsewhere, so a run
    resumed on another kind of machine computes in another dtype. run.json records the dtype
    the run started in and each resume's, and a resume in another dtype says so."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "moved"', dtype="auto")
    common = ("train.save_steps=2", 'train.lr_scheduler_type="constant"')
    assert cli("run", recipe, "train.max_steps=2", *common)[0] == 0
    run_json = tmp_path / "runs" / "moved" / "run.json"
    info = json.loads(run_json.read_text())
    here = info["compute_dtype"]
    other = {"fp32": "bf16", "bf16": "fp32"}[here]
    info["compute_dtype"] = other  # as a machine of the other kind would have written it
    run_json.write_text(json.dumps(info))
    code, _, err = cli(
        "run", recipe, "train.max_steps=4", *common, "--resume-from-checkpoint", "auto"
    )
    assert code == 0, err
    assert f"started computing in {other} and this machine computes in {here}" in err, err
    assert 'quant.dtype = "auto" resolves per machine' in err
    last = json.loads(run_json.read_text())["history"][-1]
    assert last["event"] == "resume" and last["compute_dtype"] == here


def test_extending_a_decaying_schedule_is_refused_with_the_reason(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """Under a linear decay the learning rate of the steps already trained was set for the old
    max_steps: a resume to a new max_steps can not equal an uninterrupted run of that length
    (and would train the new steps at the rate the schedule ended on), so it is refused with
    the reason and the fix. A constant schedule is extended (test_resume_equals_uninterrupted)."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "decay"')
    common = ("train.save_steps=2", 'eval.metrics=["eval_loss"]')
    assert cli("run", recipe, "train.max_steps=2", *common)[0] == 0
    run = tmp_path / "runs" / "decay"
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    code, _, err = cli(
        "run", recipe, "train.max_steps=4", *common, "--resume-from-checkpoint", "auto"
    )
    assert code == 2 and "Traceback" not in err, err
    assert "train.max_steps 2 -> 4 under the linear learning-rate schedule" in err, err
    assert "output.name=decay-2" in err and "constant" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    events = [e["event"] for e in json.loads((run / "run.json").read_text())["history"]]
    assert events == ["start"]


def test_resuming_another_runs_checkpoint_says_how(tmp_path, tiny_model_dir, chat_file, cli):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "origin"')
    assert cli("run", recipe, "train.max_steps=2", "train.save_steps=2")[0] == 0
    ckpt = tmp_path / "runs" / "origin" / "checkpoints" / "checkpoint-2"
    code, _, err = cli(
        "run", recipe, "output.name=elsewhere", "--resume-from-checkpoint", str(ckpt)
    )
    assert code == 2 and "belongs to the run in" in err and "output.name='origin'" in err
    assert "Traceback" not in err and not (tmp_path / "runs" / "elsewhere").exists()


def test_resuming_a_run_of_another_lorakit_version_says_so_once(
    tmp_path, tiny_model_dir, chat_file, cli
):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "old"')
    common = ("train.max_steps=2", "train.save_steps=2", 'eval.metrics=["eval_loss"]')
    assert cli("run", recipe, *common)[0] == 0
    run = tmp_path / "runs" / "old"
    state = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**state, "lorakit_version": "0.0.1"}))
    (run / "adapter" / "adapter_model.safetensors").unlink()  # as if killed while saving
    code, _, err = cli("run", recipe, *common, "--resume-from-checkpoint", "auto")
    assert code == 0, err
    assert err.count("made by lorakit 0.0.1") == 1, err


def test_the_val_splits_drops_are_reported_with_the_training_splits(tmp_path, tiny_model_dir, cli):
    """Over-length examples are dropped from the validation split as from the training split,
    and counted alike: printed by `run` and saved in data_report.json, never silently."""
    records = chat_records(40)
    for r in records[::2]:  # every other answer far over max_length
        r["messages"][-1]["content"] = " ".join(["red"] * 200)
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data, extra='name = "drops"')
    code, out, err = cli("run", recipe, "train.max_steps=1", "data.val_fraction=0.5")
    assert code == 0, err
    report = json.loads((tmp_path / "runs" / "drops" / "data_report.json").read_text())
    val = {k: n for k, n in report["dropped"].items() if k.endswith("(val split)")}
    train = {k: n for k, n in report["dropped"].items() if k not in val}
    assert val and train, report["dropped"]
    assert sum(val.values()) + sum(train.values()) <= 20  # the long ones, some in test
    assert "(val split)" in out + err


def test_eval_steps_with_an_empty_val_split_is_a_warning_at_the_start(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """train.eval_steps with no val example evaluates nothing; it was accepted in silence."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "noval"')
    code, _, err = cli(
        "run", recipe, "train.max_steps=1", "data.val_fraction=0", "train.eval_steps=1"
    )
    assert code == 0, err
    warning = next(line for line in err.splitlines() if "warning: train.eval_steps" in line)
    assert "val split is empty" in warning and "fix:" in warning and "val_fraction" in warning
    assert err.index(warning) < err.index("run folder"), "said at the start, before training"
    code, _, err = cli("run", recipe, "train.max_steps=1", "output.name=withval")
    assert code == 0 and "warning: train.eval_steps" not in err, err


def test_a_damaged_from_adapter_is_refused_before_the_run_folder_is_claimed(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """A from_adapter whose lorakit.json is not JSON traced back (JSONDecodeError) after the new
    run's folder was claimed; it is a one-line error naming the file, and no folder is made."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "first"')
    assert cli("run", recipe, "train.max_steps=1")[0] == 0
    meta = tmp_path / "runs" / "first" / "adapter" / "lorakit.json"
    meta.write_text("{oops")
    code, out, err = cli(
        "run", recipe, "output.name=second", 'train.from_adapter="runs/first"', "train.max_steps=1"
    )
    assert code == 2 and "Traceback" not in out + err, err
    assert f"{meta} is not valid JSON" in err and "train.from_adapter" in err and "fix:" in err
    assert not (tmp_path / "runs" / "second").exists(), "nothing is written before the inputs"
    meta.write_text("{}")
    (meta.parent / "adapter_model.safetensors").write_bytes(b"cut")
    code, _, err = cli(
        "run", recipe, "output.name=second", 'train.from_adapter="runs/first"', "train.max_steps=1"
    )
    assert code == 2 and "adapter_model.safetensors" in err, err
    assert not (tmp_path / "runs" / "second").exists()


def test_resuming_to_a_lower_max_steps_never_keeps_steps_past_it(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """A run killed after checkpoint-4 and resumed with train.max_steps=3 (a constant schedule
    may change length) kept checkpoint-4's adapter: global_step 4 under max_steps 3."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "shrink"')
    common = ('train.lr_scheduler_type="constant"', "train.save_steps=2")
    assert cli("run", recipe, "train.max_steps=4", *common)[0] == 0
    run = tmp_path / "runs" / "shrink"
    shutil.rmtree(run / "adapter")  # as if killed while saving the adapter
    (run / "eval_report.json").unlink()
    named = run / "checkpoints" / "checkpoint-4"
    code, out, err = cli(
        "run", recipe, "train.max_steps=3", *common, "--resume-from-checkpoint", named
    )
    assert code == 2 and "Traceback" not in out + err, err
    assert "is past train.max_steps = 3" in err and "checkpoint-2" in err.split("fix:")[1], err
    code, _, err = cli(
        "run", recipe, "train.max_steps=1", *common, "--resume-from-checkpoint", "auto"
    )
    assert code == 2 and "no complete checkpoint is at or below step 1" in err, err
    assert not (run / "adapter").exists()
    code, _, err = cli(
        "run", recipe, "train.max_steps=3", *common, "--resume-from-checkpoint", "auto"
    )
    assert code == 0, err
    assert "skipping checkpoint-4: it is past train.max_steps = 3" in err, err
    assert "from checkpoint-2" in err and "not training" not in err, err
    meta = json.loads((run / "adapter" / "lorakit.json").read_text())
    assert meta["global_step"] == 3


def test_a_resumed_runs_metrics_are_the_uninterrupted_runs(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """Killed after checkpoint-4's steps were logged but before checkpoint-4 was kept, a run
    resumes from checkpoint-2: its metrics.jsonl logged steps 3 and 4 twice and a summary
    whose train_loss covered the resumed steps only. Now it is the uninterrupted log, and the
    earlier attempt's whole log is kept aside."""
    from lorakit.evaluation.plot import read_curves

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "m"')
    common = ("train.max_steps=4", "train.save_steps=2", 'train.lr_scheduler_type="constant"')
    assert cli("run", recipe, *common)[0] == 0
    run = tmp_path / "runs" / "m"
    whole = (run / "metrics.jsonl").read_text()
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    (run / "eval_report.json").unlink()
    code, _, err = cli("run", recipe, *common, "--resume-from-checkpoint", "auto")
    assert code == 0 and "from checkpoint-2" in err, err
    assert (run / "metrics.attempt-1.jsonl").read_text() == whole, "nothing logged is lost"
    before = [json.loads(line) for line in whole.splitlines()]
    after = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in after] == [r["step"] for r in before] == [1, 2, 3, 4, 4]
    assert [r.get("loss") for r in after] == [r.get("loss") for r in before]  # exact resume
    assert after[-1]["train_loss"] == pytest.approx(before[-1]["train_loss"], rel=1e-9)
    train, _ = read_curves(run / "metrics.jsonl")
    assert [s for s, _ in train] == [1, 2, 3, 4], "the loss plot has each step once"
    # a log that does not reach the checkpoint's step: no whole-run mean, said, not a wrong one
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    (run / "eval_report.json").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines(True)
    (run / "metrics.jsonl").write_text(lines[0])  # step 2's record lost
    code, _, err = cli("run", recipe, *common, "--resume-from-checkpoint", "auto")
    assert code == 0 and "train_loss left out of the summary" in err, err
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "train_runtime" in last and "train_loss" not in last
