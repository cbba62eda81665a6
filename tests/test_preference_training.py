"""Preference tuning for real on the tiny Llama: DPO, SimPO and ORPO runs, DPO from an SFT
adapter (QLoRA), the reward metrics and pair evaluation, determinism, exact resume and export
(issue 23)."""

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
    with_preference_source,
    write_jsonl,
)

pytestmark = pytest.mark.slow


@pytest.fixture()
def pairs_recipe(tmp_path, tiny_model_dir, monkeypatch):
    """A tiny recipe reading 60 preference pairs with ``preference_jsonl``."""
    with_preference_source(monkeypatch)
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_records(60))
    return tiny_recipe(tmp_path, tiny_model_dir, data, source="preference_jsonl")


@pytest.mark.parametrize("objective", ["dpo", "simpo", "orpo"])
def test_each_objective_trains_logs_rewards_and_scores_held_out_pairs(
    tmp_path, pairs_recipe, cli, objective
):
    code, _, err = cli(
        "run", pairs_recipe, f'train.objective="{objective}"', "output.name=p", "train.max_steps=6"
    )
    assert code == 0, err
    run = tmp_path / "runs" / "p"
    steps = logged_steps(run)
    assert len(steps) == 6
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert all(key in s for s in steps), key
    if objective == "dpo":  # a fresh adapter is the reference exactly: no reward at step 1
        assert steps[0]["rewards/chosen"] == 0.0 and steps[0]["loss"] == pytest.approx(0.693147)
    assert "reward acc" in err, "the step line shows the reward accuracy"
    split = held_out_results(run)
    assert 0.0 <= split["tuned"]["metrics"]["pref_accuracy"] <= 1.0
    assert "pref_margin" in split["base"]["metrics"]
    assert split["tuned"]["counts"]["pairs"] == split["tuned"]["counts"]["examples"]
    assert ("reward_accuracy" in split["tuned"]["metrics"]) == (objective == "dpo")
    assert "preference accuracy base" in err
    code, out, _ = cli("compare", tmp_path / "runs")
    assert code == 0 and "pref_accuracy" in out.splitlines()[0]


def test_dpo_from_an_sft_qlora_adapter_uses_it_as_the_reference(tmp_path, pairs_recipe, cli):
    text = pairs_recipe.read_text()
    qlora = text.replace(
        'plugin = "none"\ndtype = "fp32"', 'plugin = "bnb-4bit"\ncompute_dtype = "fp32"'
    )
    assert qlora != text
    pairs_recipe.write_text(qlora)
    # SFT on the chosen answers first (a pair is a conversation ending with the chosen turn)
    code, _, err = cli("run", pairs_recipe, "output.name=sft", "train.max_steps=15")
    assert code == 0, err
    code, _, err = cli(
        "run",
        pairs_recipe,
        "output.name=dpo",
        'train.objective="dpo"',
        'train.from_adapter="runs/sft"',
        "train.max_steps=4",
        "train.learning_rate=1e-3",
    )
    assert code == 0, err
    assert "starting from the adapter in" in err and "quant bnb-4bit" in err
    first = logged_steps(tmp_path / "runs" / "dpo")[0]
    # the reference is the SFT adapter: at step 1 the policy is that adapter (up to its
    # dropout), so the rewards are near 0; against the base they would be beta x what SFT
    # moved the log-probabilities (several nats)
    assert abs(first["rewards/chosen"]) < 0.05 and abs(first["rewards/rejected"]) < 0.05, first
    split = held_out_results(tmp_path / "runs" / "dpo")
    assert split["start"]["adapter"].endswith("runs/sft/adapter")
    assert split["start"]["metrics"]["pref_margin"] != split["base"]["metrics"]["pref_margin"]
    assert "reward_accuracy" in split["tuned"]["metrics"]
    code, out, _ = cli("compare", tmp_path / "runs" / "dpo")
    assert code == 0 and "| start |" in out
    resolved = json.loads((tmp_path / "runs" / "dpo" / "resolved.json").read_text())
    assert resolved["train"]["from_adapter"] == "runs/sft"


def test_same_seed_same_adapter_and_resume_equals_uninterrupted(tmp_path, pairs_recipe, cli):
    common = ['train.objective="dpo"', 'train.lr_scheduler_type="constant"', "train.save_steps=2"]
    resumed, full = assert_seeded_and_resumes(cli, pairs_recipe, tmp_path / "runs", common)
    assert resumed["rewards/margins"] == full["rewards/margins"]


def test_a_preference_adapter_exports_and_merges(tmp_path, pairs_recipe, cli):
    code, _, err = cli(
        "run", pairs_recipe, 'train.objective="simpo"', "output.name=s", "train.max_steps=2"
    )
    assert code == 0, err
    code, _out, err = cli("export", tmp_path / "runs" / "s", "--merge")
    assert code == 0, err
    merged = list((tmp_path / "runs" / "s").glob("**/model*.safetensors"))
    assert merged, "the merged model is written"
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(tmp_path / "runs" / "s" / "adapter")).r == 4


def test_a_dpo_adapter_merges_and_exports_to_gguf_as_the_trained_model(
    tmp_path, pairs_recipe, tiny_model_dir, cli
):
    """A DPO run exported with --merge --gguf: the merged model and the f32 GGUF give the logits
    of the base + trained adapter as stock PEFT loads it, and those differ from the base's."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    code, _, err = cli("run", pairs_recipe, "output.name=d", "train.max_steps=3")
    assert code == 0, err
    run = tmp_path / "runs" / "d"
    code, _, err = cli("export", run, "--merge", "--gguf", "--gguf-type", "f32")
    assert code == 0, err
    export = run / "export"
    parity = json.loads((export / "gguf" / "parity.json").read_text())
    assert parity["comparisons"]["gguf_f32"]["argmax_agreement"] == 1.0

    def load(path: Path, **kw) -> object:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw)

    base = load(tiny_model_dir)
    ids = torch.tensor([[1, 5, 17, 40, 99, 2, 7, 33, 12]])
    with torch.inference_mode():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(run / "adapter")).eval()(ids).logits
        merged = load(export / "merged")(ids).logits
        gguf = load(export / "gguf", gguf_file="d-F32.gguf")(ids).logits
    assert float((tuned - base_logits).abs().max()) > 1e-4, "DPO moved the model"
    assert float((merged - tuned).abs().max()) < 1e-4
    assert float((gguf - merged).abs().max()) < 1e-5


def test_dpo_reward_metrics_survive_a_reused_baseline(tmp_path, pairs_recipe, cli):
    """The base's pair margins are DPO's reference: a reused baseline rebuilt the base without
    them, and reward_accuracy and reward_margin disappeared without a word."""
    common = ['train.objective="dpo"', "output.name=rb", 'eval.metrics=["eval_loss"]']
    code, _, err = cli("baseline", pairs_recipe, *common)
    assert code == 0, err
    code, _, err = cli("run", pairs_recipe, *common, "train.max_steps=2")
    assert code == 0, err
    assert "reusing the baseline" in err
    split = held_out_results(tmp_path / "runs" / "rb")
    assert {"reward_accuracy", "reward_margin"} <= set(split["tuned"]["metrics"])
