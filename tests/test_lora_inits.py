"""LoRA inits (PiSSA, OLoRA, LoftQ, EVA), LoRA+, NEFTune, rank/alpha patterns and
modules_to_save (issue 22): recipe errors, resume equality, the converted adapter in stock PEFT,
and modules_to_save through merge and GGUF export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import tiny_recipe


def _check(cli, recipe: Path, *overrides: str) -> str:
    code, out, err = cli("check", recipe, *overrides)
    assert code == 2, out + err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("quant", "overrides", "expected"),
    [
        ("none", ['peft.init="loftq"'], ['[peft].init = "loftq"', "[quant].plugin = 'none'"]),
        ("bnb-8bit", ['peft.init="olora"'], ["[peft].init = 'olora'", "QPiSSA", "bnb-4bit"]),
        ("none", ['peft.init="eva"', 'train.objective="dpo"'], ['"eva"', "[train].objective"]),
        ("none", ["peft.pissa_niter=4"], ["pissa_niter = 4", 'init = "pissa"']),
        ("none", ['peft.init="pissa"', "peft.eva_batches=2"], ["eva_batches = 2"]),
        ("none", ["peft.lora_plus_ratio=0.5"], ["lora_plus_ratio = 0.5"]),
        (
            "none",
            ['peft.init="olora"', "peft.use_rslora=true", "peft.rank_pattern={q_proj=8}"],
            ["use_rslora", "rank_pattern", "PEFT refuses"],
        ),
        ("none", ["peft.rank_pattern={q_proj=0}"], ["rank_pattern.q_proj = 0"]),
        ("none", ['peft.init="svd"'], ["[peft].init"]),
        ("none", ["train.neftune_noise_alpha=-1"], ["[train].neftune_noise_alpha"]),
    ],
)
def test_bad_combinations_name_the_keys(
    tmp_path, tiny_model_dir, chat_file, cli, quant, overrides, expected
):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, quant=quant)
    err = _check(cli, recipe, *overrides)
    for text in expected:
        assert text in err, err


def test_new_options_leave_old_recipes_settings_alone(tmp_path, tiny_model_dir, chat_file):
    """Options added for issue 22 are recorded only when set: a recipe that does not use them
    resolves (and hashes) as before, so its earlier runs still resume and export."""
    from lorakit.recipe import load_recipe

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file)
    plain = load_recipe(recipe, ()).resolved()
    new_keys = {"init", "pissa_niter", "eva_batches", "lora_plus_ratio", "rank_pattern"}
    assert not new_keys & set(plain["peft"]) and "neftune_noise_alpha" not in plain["train"]
    used = load_recipe(recipe, ('peft.init="pissa"', "train.neftune_noise_alpha=5"))
    assert used.resolved()["peft"]["init"] == "pissa"
    assert used.resolved()["train"]["neftune_noise_alpha"] == 5


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


RESUMED = [
    ("none", ['peft.init="pissa"']),
    ("none", ['peft.init="pissa"', "peft.pissa_niter=2"]),
    ("none", ['peft.init="olora"']),
    ("none", ['peft.init="eva"', "peft.eva_batches=2"]),
    ("bnb-4bit", ['peft.init="loftq"']),
    ("bnb-4bit", ['peft.init="pissa"']),
    ("bnb-4bit", ['peft.init="olora"']),
    ("none", ["peft.lora_plus_ratio=16", "train.neftune_noise_alpha=5"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("quant", "options"), RESUMED, ids=lambda x: str(x))
def test_each_init_resumes_to_the_uninterrupted_adapter(
    tmp_path, tiny_model_dir, chat_file, cli, quant, options
):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, quant=quant)
    common = [*options, 'train.lr_scheduler_type="constant"', "train.save_steps=2"]
    common += ['eval.metrics=["eval_loss"]', "eval.canary=false"]
    code, _, err = cli("run", recipe, "output.name=full", "train.max_steps=4", *common)
    assert code == 0, err
    code, _, err = cli("run", recipe, "output.name=split", "train.max_steps=2", *common)
    assert code == 0, err
    code, _, err = cli(
        "run",
        recipe,
        "output.name=split",
        "train.max_steps=4",
        *common,
        "--resume-from-checkpoint",
        "auto",
    )
    assert code == 0, err
    full, split = (_adapter(tmp_path / "runs" / n) for n in ("full", "split"))
    assert full.keys() == split.keys()
    assert all(full[k].equal(split[k]) for k in full), "resumed adapter differs"
    meta = json.loads((tmp_path / "runs" / "full" / "adapter" / "lorakit.json").read_text())
    init = next((o.split('"')[1] for o in options if o.startswith("peft.init")), None)
    assert meta.get("init") == init


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.slow
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_loads_in_stock_peft_and_keeps_modules_to_save(
    tmp_path, tiny_model_dir, chat_file, cli, init
):
    """The saved adapter of a PiSSA/OLoRA run is a plain LoRA (rank 2r) on the *original* base:
    stock PEFT gives the trained model's logits, and a trained lm_head (modules_to_save) is in
    the adapter, the merged export and the GGUF."""
    import torch
    from helpers import load_tiny_model
    from lorakit.checkpoints import load_checkpoint_adapter
    from lorakit.modeling import attach_new_adapter
    from lorakit.session import open_session
    from peft import PeftModel

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file)
    opts = [f'peft.init="{init}"', 'peft.modules_to_save=["lm_head"]', "output.name=r"]
    opts += ['eval.metrics=["eval_loss"]', "eval.canary=false", "train.save_steps=4"]
    code, _, err = cli("run", recipe, *opts)
    assert code == 0, err
    run = tmp_path / "runs" / "r"
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    tensors = _adapter(run)
    assert any("lm_head.modules_to_save" in k or "lm_head.weight" in k for k in tensors), (
        tensors.keys()
    )

    ids = list(range(3, 40))
    # the trained model: the residual base recomputed the way training did, plus checkpoint-4
    session = open_session(str(recipe), overrides=tuple(opts))
    torch.manual_seed(7)
    trained = attach_new_adapter(load_tiny_model(tiny_model_dir), session.components.peft, 7)
    load_checkpoint_adapter(trained, run / "checkpoints" / "checkpoint-4")
    trained.eval()
    expected = _logits(trained, ids)
    base = load_tiny_model(tiny_model_dir)
    before = _logits(base, ids)
    stock = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    got = _logits(stock, ids)
    assert (got - expected).abs().max() < 1e-4
    assert (got - before).abs().max() > 1e-3, "the adapter must change the model"

    code, _, err = cli("export", run, "--merge", "--gguf", "--gguf-type", "f32")
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(
        str(run / "export" / "merged"), dtype=torch.float32
    )
    assert (_logits(merged.eval(), ids) - expected).abs().max() < 1e-4
    head = merged.lm_head.weight
    assert not head.equal(load_tiny_model(tiny_model_dir).lm_head.weight), "trained head lost"
    parity = json.loads((run / "export" / "parity.json").read_text())
    assert parity, "the export's parity report is written"


@pytest.mark.slow
def test_quant_gap_measures_the_quantized_base_on_val_examples(
    tmp_path, tiny_model_dir, chat_file, cli
):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, quant="bnb-4bit")
    code, out, err = cli("plan", recipe, "--quant-gap", "4")
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("quantization gap (bnb-4bit)"))
    assert "on 4 val examples" in line and "KL" in line and "top-1 agreement" in line
    code, out, err = cli("plan", tiny_recipe(tmp_path, tiny_model_dir, chat_file), "--quant-gap")
    assert code == 0 and "does not quantize" in err


def test_gap_advice_names_the_fixes_with_numbers():
    from lorakit.quant_gap import Gap, advice

    large = advice(Gap(16, 445, 1.1268, 1.4412, 0.2553, 0.789), "bnb-4bit")
    assert "+27.9%" in large[0] and "78.9%" in large[0]
    assert any('init = "loftq"' in x for x in large) and any("bnb-8bit" in x for x in large)
    small = advice(Gap(16, 445, 1.0, 1.01, 0.001, 0.99), "bnb-8bit")
    assert "small" in small[1] and len(small) == 2
