"""LoRA inits (PiSSA, OLoRA, LoftQ, EVA), LoRA+, NEFTune, rank/alpha patterns and
modules_to_save (issue 22): recipe errors, resume equality, the converted adapter in stock PEFT,
and modules_to_save through merge and GGUF export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import resume_split_run, run_adapter, tiny_recipe


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
        ("bnb-4bit", ['peft.init="pissa"', "peft.loftq_iter=2"], ["loftq_iter = 2"]),
        (
            "none",
            ['peft.init="olora"', "peft.use_rslora=true", "peft.rank_pattern={q_proj=8}"],
            ["use_rslora", "rank_pattern", "PEFT refuses"],
        ),
        ("none", ["peft.rank_pattern={q_proj=0}"], ["[peft].rank_pattern.q_proj: must be 1"]),
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


RESUMED = [
    ("none", ['peft.init="pissa"']),
    ("none", ['peft.init="pissa"', "peft.pissa_niter=2"]),
    ("none", ['peft.init="olora"']),
    ("none", ['peft.init="eva"', "peft.eva_batches=2"]),
    ("bnb-4bit", ['peft.init="loftq"']),
    ("bnb-4bit", ['peft.init="pissa"']),
    ("bnb-4bit", ['peft.init="olora"']),
    ("bnb-4bit", ['peft.init="loftq"', "peft.loftq_iter=3"]),
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
    split = resume_split_run(cli, recipe, tmp_path / "runs", common)
    full = run_adapter(tmp_path / "runs" / "full")
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
    tensors = run_adapter(run)
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
    _checkpoint_refused(cli, tmp_path, run, init)
    code, _, err = cli(
        "run",
        recipe,
        *opts[1:],
        "output.name=next",
        "train.max_steps=2",
        f'train.from_adapter="{run / "checkpoints" / "checkpoint-4"}"',
    )
    assert code == 2 and "not converted" in err, err


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
    assert any('init = "pissa"' in x and "QPiSSA" in x for x in large)
    small = advice(Gap(16, 445, 1.0, 1.01, 0.001, 0.99), "bnb-8bit")
    assert "small" in small[1] and len(small) == 2


def _reference_models(tiny_model_dir, session, checkpoint: Path):
    """The QPiSSA model as trained, built from stock parts: PEFT's init on the fp32 base
    (seeded as the run), each residual quantized and dequantized by bitsandbytes, the trained
    A/B of the raw checkpoint; and the same with the residual unquantized."""
    import bitsandbytes as bnb
    import torch
    from helpers import load_tiny_model
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    models = []
    for quantized in (True, False):
        torch.manual_seed(7)
        model = get_peft_model(
            load_tiny_model(tiny_model_dir), session.components.peft.peft_config()
        )
        for module in model.modules():
            if isinstance(module, LoraLayer) and quantized:
                weight = module.get_base_layer().weight
                q, state = bnb.functional.quantize_4bit(
                    weight.data, blocksize=64, compress_statistics=True, quant_type="nf4"
                )
                weight.data = bnb.functional.dequantize_4bit(q, state).to(torch.float32)
        set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))
        models.append(model.eval())
    return models


@pytest.mark.slow
@pytest.mark.parametrize(
    ("init", "extra"), [("pissa", []), ("olora", []), ("loftq", ["peft.loftq_iter=3"])]
)
def test_qpissa_quantizes_the_residual_and_every_path_gives_the_model_as_trained(
    tmp_path, tiny_model_dir, chat_file, cli, init, extra
):
    """PiSSA/OLoRA (and multi-pass LoftQ) on a 4-bit base: the start from the fp32 weights,
    only the residual quantized. eval/generate load that model; stock PEFT on the original base
    gives the trained adapter on the unquantized residual; --merge-base dequantized and
    --gguf --base-only reproduce the model as trained (the export checks the GGUF itself).
    PiSSA/OLoRA's model as trained is also rebuilt from stock PEFT and bitsandbytes alone."""
    import torch
    from lorakit.load_run import load_model, prepare_inference
    from lorakit.modeling import load_base_model
    from lorakit.qpissa import adapter_off
    from lorakit.session import open_session
    from peft import PeftModel

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, quant="bnb-4bit")
    opts = [f'peft.init="{init}"', *extra, "output.name=q", "train.save_steps=4"]
    opts += ['eval.metrics=["eval_loss"]', "eval.canary=false"]
    code, _, err = cli("run", recipe, *opts)
    assert code == 0, err
    assert f"{init} init on the fp32 base" in err
    run = tmp_path / "runs" / "q"
    meta = json.loads((run / "adapter" / "lorakit.json").read_text())
    assert meta["init"] == init and meta["quantized_residual"] is True
    assert meta.get("loftq_iter") == (3 if extra else None)
    session = open_session(str(recipe), overrides=tuple(opts))
    ids = list(range(3, 40))
    loaded = prepare_inference(session.recipe, session.components, run / "adapter")
    model = load_model(loaded, run / "adapter")  # eval, generate: 4-bit residual + A/B
    if init == "loftq":  # no stock reference: the merge paths below are held to this one
        expected = _logits(model, ids)
        unquantized = None
    else:
        as_trained, unquantized = _reference_models(
            tiny_model_dir, session, run / "checkpoints" / "checkpoint-4"
        )
        expected = _logits(as_trained, ids)
    assert (_logits(model, ids) - expected).abs().max() < 1e-4

    # adapter off: the original 4-bit base
    with adapter_off(model):
        base_logits = _logits(model, ids)
    plain = load_base_model(loaded.ref, loaded.components.quant, "cpu").eval()
    assert (base_logits - _logits(plain, ids)).abs().max() < 1e-5
    assert (_logits(model, ids) - expected).abs().max() < 1e-4, "adapter_off restores it"

    # stock PEFT on the original fp32 base: the trained adapter on the unquantized residual
    from helpers import load_tiny_model

    stock = PeftModel.from_pretrained(load_tiny_model(tiny_model_dir), str(run / "adapter"))
    if unquantized is not None:
        assert (_logits(stock.eval(), ids) - _logits(unquantized, ids)).abs().max() < 1e-4
    else:  # LoftQ's start is W only approximately: the adapter loads and changes the model
        before = _logits(load_tiny_model(tiny_model_dir), ids)
        assert (_logits(stock.eval(), ids) - before).abs().max() > 1e-3

    code, _, err = cli("export", run, "--merge", "--merge-base", "dequantized")
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(
        str(run / "export" / "merged"), dtype=torch.float32
    )
    assert (_logits(merged.eval(), ids) - expected).abs().max() < 1e-4
    out = tmp_path / "gguf"
    code, _, err = cli("export", run, "--gguf", "--base-only", "--gguf-type", "f32", "--out", out)
    assert code == 0, err  # the base GGUF + the adapter is held to the trained model (f32)
    parity = json.loads((out / "gguf" / "parity.json").read_text())
    assert parity["base_only"] and "unmerged" in parity["trained"]["comparisons"]
    assert parity["comparisons"]["gguf_f32"]["with_adapter"]["max_abs_logit_diff"] < 1e-4
    code, out_text, err = cli("generate", run, "--prompt", "hello", "--max-new-tokens", "4")
    assert code == 0 and out_text.strip(), err
    _checkpoint_refused(cli, tmp_path, run, init)


def _checkpoint_refused(cli, tmp_path, run: Path, init: str) -> None:
    """A PiSSA/OLoRA run's raw checkpoint (adapter not converted) is refused by every verb
    that would load it on the original base, naming the run to use instead."""
    checkpoint = run / "checkpoints" / "checkpoint-4"
    for verb in (["eval"], ["generate", "--prompt", "hi"], ["export"]):
        code, _, err = cli(verb[0], checkpoint, *verb[1:])
        assert code == 2 and "Traceback" not in err, err
        assert "not converted" in err and f"'{init}'" in err and str(run) in err, err


def test_a_checkpoint_folder_is_not_a_run_folder(tmp_path, cli):
    """eval/generate/export name the run a checkpoint belongs to (no training: the folders
    are laid out as a run writes them)."""
    run = tmp_path / "runs" / "r"
    checkpoint = run / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "resolved.json").write_text(json.dumps({"peft": {"r": 4}}))
    code, _, err = cli("export", checkpoint)
    # no adapter/ yet (stopped before the end): the run folder would be refused too
    assert code == 2 and "once it has its adapter/" in err, err
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    for verb in (["eval"], ["generate", "--prompt", "hi"], ["export"]):
        code, _, err = cli(verb[0], checkpoint, *verb[1:])
        assert code == 2 and "checkpoint-2 of the run" in err, err
        assert "its adapter/ is the final" in err and "Traceback" not in err, err
    (run / "resolved.json").write_text(json.dumps({"peft": {"init": "olora"}}))
    code, _, err = cli("export", checkpoint)
    assert code == 2 and "not converted" in err and "init = 'olora'" in err, err


def _start_error(tiny_model_dir, residual) -> float:
    """How far the 4-bit start (quantized residual + s*B0@A0) is from the fp32 weights."""
    import bitsandbytes as bnb
    import torch
    from helpers import load_tiny_model

    original = dict(load_tiny_model(tiny_model_dir).named_modules())
    total = 0.0
    for name, weight in residual.weights.items():
        q = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, quant_type="nf4").to("cpu")
        start = bnb.functional.dequantize_4bit(q.data, q.quant_state)
        a0 = residual.initial[f"base_model.model.{name}.lora_A.weight"]
        b0 = residual.initial[f"base_model.model.{name}.lora_B.weight"]
        start = start + residual.scaling[name] * (b0 @ a0)
        total += float(torch.linalg.norm(original[name].weight - start) ** 2)
    return total**0.5


def test_multi_pass_loftq_starts_closer_to_the_fp32_weights(tmp_path, tiny_model_dir, chat_file):
    """loftq_iter = N alternates 4-bit quantization and the rank-r fit on the fp32 weights
    (PEFT 0.21's multi-pass LoftQ quantizes on CUDA only): the start gets closer to the
    original weights than one pass, and the base holds the quantized residual."""
    from lorakit.modeling import resolve_model
    from lorakit.qpissa import compute_residual, quantizes_residual
    from lorakit.session import open_session

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, quant="bnb-4bit")
    errors = {}
    for passes in (1, 4):
        overrides = ('peft.init="loftq"', f"peft.loftq_iter={passes}", "quant.double_quant=false")
        session = open_session(str(recipe), overrides=overrides)
        ref = resolve_model(session.components.model_source)
        residual = compute_residual(ref, session.components, 7, None)
        assert quantizes_residual(session.recipe, session.components.quant) == (passes > 1)
        errors[passes] = _start_error(tiny_model_dir, residual)
    assert errors[4] < 0.97 * errors[1], errors
