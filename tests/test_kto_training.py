"""KTO for real on the tiny Llama: unpaired answers and pairs as KTO data, TRL's metrics in
metrics.jsonl, held-out answers scored, determinism and exact resume (issue 23)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import (
    assert_seeded_and_resumes,
    held_out_results,
    logged_steps,
    preference_records,
    tiny_recipe,
    unpaired_records,
    with_preference_source,
    write_jsonl,
)

pytestmark = pytest.mark.slow

KTO = 'train.objective="kto"'


def _recipe(tmp_path: Path, tiny_model_dir: Path, records: list[dict]) -> Path:
    data = write_jsonl(tmp_path / "answers.jsonl", records)
    return tiny_recipe(tmp_path, tiny_model_dir, data, source="preference_jsonl")


@pytest.fixture()
def answers_recipe(tmp_path, tiny_model_dir, monkeypatch):
    """A tiny recipe reading 60 unpaired answers (30 desirable) with ``preference_jsonl``."""
    with_preference_source(monkeypatch)
    return _recipe(tmp_path, tiny_model_dir, unpaired_records(60))


def test_kto_on_unpaired_answers_logs_trl_metrics_and_scores_held_out_answers(
    tmp_path, answers_recipe, cli
):
    code, out, err = cli("check", answers_recipe, KTO)
    assert code == 0, err
    assert "labelled answers (objective kto):" in out
    assert "desirable" in out and "undesirable answers" in out
    code, _, err = cli(
        "run", answers_recipe, KTO, "output.name=k", "train.max_steps=6", "train.eval_steps=3"
    )
    assert code == 0, err
    run = tmp_path / "runs" / "k"
    steps = logged_steps(run)
    assert len(steps) == 6
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl"):
        assert all(key in s for s in steps), key
    # a fresh adapter is the reference exactly: no reward, KL 0, loss 1 - σ(0) = 0.5 at step 1
    first = steps[0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["kl"] == 0.0 and first["loss"] == pytest.approx(0.5)
    assert any(s["kl"] > 0 for s in steps[1:]), "the policy moves off the reference"
    for s in steps:  # TRL's margin: the mean desirable reward minus the mean undesirable one
        assert s["rewards/margins"] == pytest.approx(
            s["rewards/chosen"] - s["rewards/rejected"], abs=2e-6
        )
    assert ", kl " in err, "the step line shows the KL estimate"
    evals = [
        json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_kl" in x
    ]
    assert evals and "eval_loss" in evals[0] and "eval_rewards/chosen" in evals[0]
    split = held_out_results(run)
    tuned, base = split["tuned"]["metrics"], split["base"]["metrics"]
    assert split["tuned"]["counts"]["answers"] == split["tuned"]["counts"]["examples"]
    assert tuned["desirable_logp"] != base["desirable_logp"], "the tuned adapter is scored"
    assert "undesirable_logp" in base


def test_apo_zero_unpaired_trains_without_a_reference_point_on_single_answer_batches(
    tmp_path, answers_recipe, cli
):
    """TRL's ``apo_zero_unpaired``: no KL estimate, so micro-batches of one answer are fine and
    the logged ``kl`` stays 0 while the rewards move (the ``kto`` loss's ``kl`` does not: the
    test above)."""
    args = ['train.kto_loss="apo_zero_unpaired"', "train.per_device_train_batch_size=1"]
    code, _, err = cli("run", answers_recipe, KTO, *args, "output.name=apo", "train.max_steps=6")
    assert code == 0, err
    run = tmp_path / "runs" / "apo"
    steps = logged_steps(run)
    assert len(steps) == 6 and all(s["kl"] == 0.0 for s in steps)
    assert steps[0]["loss"] == pytest.approx(0.5), "1 - σ(0) for a fresh adapter"
    moved = [s.get("rewards/chosen", s.get("rewards/rejected")) for s in steps[1:]]
    assert any(m != 0.0 for m in moved), "the policy moves off the reference"
    resolved = json.loads((run / "resolved.json").read_text())
    assert resolved["train"]["kto_loss"] == "apo_zero_unpaired"


def test_a_preference_run_in_bf16_scores_the_reference_in_each_step_or_says_why_not(
    tmp_path, answers_recipe, cli
):
    """bf16 log-probabilities of the same answers differ by up to ~1 nat with how they are
    packed (SmolLM2-135M, docs/preference.md; NF4 QLoRA in bf16 too). ``auto`` then scores the
    reference in each step's own row (tests/test_step_reference.py); a reference computed once
    gets a note that says which keys avoid the noise."""
    args = ["quant.dtype=bf16", "train.max_steps=1"]
    code, _, err = cli("run", answers_recipe, KTO, *args, "output.name=a")
    assert code == 0, err
    assert "reference log-probabilities: in each step" in err and "note: objective" not in err
    once = 'train.reference_logps="once"'
    code, _, err = cli("run", answers_recipe, KTO, *args, once, "output.name=b")
    assert code == 0, err
    assert "note: objective kto in bf16 with the reference log-probabilities computed once" in err
    assert 'reference_logps = "every_step"' in err and 'quant.dtype = "fp32"' in err
    code, _, err = cli("run", answers_recipe, KTO, "output.name=f", "train.max_steps=1")
    assert code == 0 and "in bf16" not in err and "in each step" not in err, "fp32: once"
    text = answers_recipe.read_text()  # QLoRA computing in bf16: the same, and its own key
    answers_recipe.write_text(
        text.replace(
            'plugin = "none"\ndtype = "fp32"', 'plugin = "bnb-4bit"\ncompute_dtype = "bf16"'
        )
    )
    code, _, err = cli("run", answers_recipe, KTO, once, "output.name=q", "train.max_steps=1")
    assert code == 0, err
    assert "note: objective kto in bf16" in err and 'quant.compute_dtype = "fp32"' in err


def test_kto_reads_pairs_as_one_desirable_and_one_undesirable_answer(
    tmp_path, tiny_model_dir, monkeypatch, cli
):
    with_preference_source(monkeypatch)
    recipe = _recipe(tmp_path, tiny_model_dir, preference_records(30))
    code, out, err = cli("check", recipe, KTO)
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.strip().startswith("train:"))
    n = int(line.split("(")[1].split()[0])
    assert f"({n} desirable, {n} undesirable)" in line, line
    code, _, err = cli("run", recipe, KTO, "output.name=p", "train.max_steps=2")
    assert code == 0, err
    assert "reference log-probabilities of" in err and "answers" in err
    split = held_out_results(tmp_path / "runs" / "p")
    assert "pref_accuracy" in split["tuned"]["metrics"], "held-out pairs are scored as pairs"
    assert "desirable_logp" in split["tuned"]["metrics"]


def test_kto_from_an_sft_qlora_adapter_uses_it_as_the_reference(tmp_path, answers_recipe, cli):
    text = answers_recipe.read_text()
    qlora = text.replace(
        'plugin = "none"\ndtype = "fp32"', 'plugin = "bnb-4bit"\ncompute_dtype = "fp32"'
    )
    assert qlora != text
    answers_recipe.write_text(qlora)
    # SFT first: it learns from the desirable answers only, the undesirable ones are counted
    code, _, err = cli("run", answers_recipe, "output.name=sft", "train.max_steps=8")
    assert code == 0, err
    report = json.loads((tmp_path / "runs" / "sft" / "data_report.json").read_text())
    assert any("undesirable answer" in k for k in report["dropped"]), report
    code, _, err = cli(
        "run",
        answers_recipe,
        "output.name=kto",
        KTO,
        'train.from_adapter="runs/sft"',
        "train.max_steps=3",
        "train.learning_rate=1e-3",
    )
    assert code == 0, err
    assert "starting from the adapter in" in err and "quant bnb-4bit" in err
    first = logged_steps(tmp_path / "runs" / "kto")[0]
    # the reference is the SFT adapter: at step 1 the mismatched rows score the same under the
    # model and the reference (both in eval mode), so the KL estimate is exactly 0, and the
    # rewards are near 0 (the policy differs from it by its dropout only); against the base
    # they would be beta x what SFT moved the log-probabilities
    assert first["kl"] == 0.0
    assert abs(first["rewards/chosen"]) < 0.05 and abs(first["rewards/rejected"]) < 0.05, first
    split = held_out_results(tmp_path / "runs" / "kto")
    assert split["start"]["adapter"].endswith("runs/sft/adapter")
    assert "desirable_logp" in split["start"]["metrics"]


def test_kto_same_seed_same_adapter_and_resume_equals_uninterrupted(tmp_path, answers_recipe, cli):
    common = [KTO, 'train.lr_scheduler_type="constant"', "train.save_steps=2"]
    resumed, full = assert_seeded_and_resumes(cli, answers_recipe, tmp_path / "runs", common)
    assert resumed["kl"] == full["kl"]
    assert resumed["rewards/margins"] == full["rewards/margins"]


def test_the_mismatched_rows_reference_is_the_adapter_the_run_starts_from(tiny_model_dir):
    """``StartWeights`` on a real PEFT model with a non-zero adapter (an SFT start): at the
    start the model and the reference score the mismatched rows alike; after the adapter moves,
    the reference is still the starting adapter (not the base), and the moved weights are back."""
    import torch
    from lorakit.attention import packed_attention
    from lorakit.kto import StartWeights, mismatched_logps, pack_answers
    from lorakit.loss import accepts_logits_to_keep
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in lora_b:
            p.normal_(std=0.5)  # an SFT adapter: not the base
    model.train()
    start = StartWeights(model)
    rows = [
        {"input_ids": [5, 9, 14, 21, 30, 31], "labels": [-100] * 4 + [30, 31], "desirable": True},
        {"input_ids": [7, 8, 40, 41, 42], "labels": [-100] * 2 + [40, 41, 42], "desirable": False},
        {"input_ids": [3, 4, 6, 50], "labels": [-100] * 3 + [50], "desirable": True},
    ]
    kl = pack_answers(rows)["kl"]
    head = accepts_logits_to_keep(model)
    with packed_attention(model, "cpu"):
        policy, reference = mismatched_logps(model, kl, head, start)
        assert torch.equal(policy, reference)
        assert model.training, "the train mode is restored"
        with torch.no_grad():
            for p in lora_b:
                p.add_(0.3)  # a training step moved the adapter
        moved = [p.detach().clone() for p in lora_b]
        policy2, reference2 = mismatched_logps(model, kl, head, start)
        assert torch.equal(reference2, reference) and not torch.equal(policy2, reference2)
        assert all(torch.equal(p, m) for p, m in zip(lora_b, moved, strict=True))
        with model.disable_adapter(), torch.no_grad():
            from lorakit.preference import sequence_logps

            model.eval()
            base_logps, _ = sequence_logps(model, kl, head)
        assert not torch.allclose(base_logps, reference), "the reference is the start adapter"


@pytest.mark.parametrize("reference", ["once", "every_step"])
def test_kto_under_two_ranks_completes_with_the_reference_point_shared(
    tmp_path, tiny_model_dir, monkeypatch, reference
):
    """DDP on CPU (gloo): the ranks average their KL estimates every step (a collective in the
    loss), in evaluation too (as TRL's gather does): there every rank scores as many eval
    batches, one with fewer answers scoring a stand-in batch that does not count. One answer
    per eval batch and an odd number of them make rank 1 do that. The answers' reference
    computed once, or in each step on each rank (the adapter switched off on the unwrapped
    model, outside DDP's forward)."""
    import os
    import subprocess
    import sys

    from helpers import REPO

    with_preference_source(monkeypatch)
    recipe = _recipe(tmp_path, tiny_model_dir, unpaired_records(40))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [KTO, "output.name=ddp", "train.max_steps=3", "train.eval_steps=2", "--nproc", "2"]
    args[1:1] = ["train.per_device_eval_batch_size=1", f'train.reference_logps="{reference}"']
    proc = subprocess.run(
        [sys.executable, "-m", "lorakit.cli.main", "run", str(recipe), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "runs" / "ddp"
    steps = logged_steps(run)
    assert len(steps) == 3 and steps[0]["kl"] == 0.0 and steps[0]["loss"] == pytest.approx(0.5)
    assert ("reference log-probabilities: in each step" in proc.stderr) == (reference != "once")
    info = json.loads((run / "run.json").read_text())
    assert info["batch"]["world_size"] == 2
    counts = json.loads((run / "data_report.json").read_text())["counts"]
    assert counts["val"] % 2 == 1, "rank 1 must have a stand-in eval batch"
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_kl" in e and "eval_loss" in e for e in evals)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
