"""`lorakit plan`: exact parameter counts from a config dict, the byte arithmetic, the CLI."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_probe, tiny_recipe
from lorakit.device import return_freed_memory
from lorakit.memory_plan import (
    PlanInputs,
    dequant_bytes,
    head_copy_bytes,
    lora_params,
    make_plan,
    parse_size,
    quantized_bytes,
    shape_from_config,
    weight_bytes,
)

# Mistral-7B-v0.1 / -Instruct-v0.2 config.json, the keys that decide the sizes
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": None,
    "tie_word_embeddings": False,
}


def test_mistral_7b_counts_are_exact():
    shape = shape_from_config(MISTRAL_7B)
    assert shape.total_params() == 7_241_732_096
    assert lora_params(shape, 16, "all-linear") == (41_943_040, [])
    assert lora_params(shape, 8, ["q_proj", "v_proj"]) == (32 * 8 * (4096 * 2 + 4096 + 1024), [])
    assert lora_params(shape, 8, ["q_proj", "wqkv"])[1] == ["wqkv"]


def test_smollm2_count_matches_transformers():
    # 134,515,008: what transformers reports for SmolLM2-135M (tied embeddings)
    shape = shape_from_config(
        {
            "vocab_size": 49152,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "tie_word_embeddings": True,
        }
    )
    assert shape.total_params() == 134_515_008


def test_quantized_bytes_per_weight():
    n = 64 * 256 * 100
    assert quantized_bytes(n, 0, "nf4") == n // 2 + n // 16  # + fp32 absmax per 64
    assert quantized_bytes(n, 0, "nf4", double_quant=True) == n // 2 + n // 64 + n // 4096
    assert quantized_bytes(n, 10, "int8") == n + 40
    assert quantized_bytes(n, 0, "bf16") == 2 * n
    shape = shape_from_config(MISTRAL_7B)
    nf4 = weight_bytes(shape, "nf4", True, "bf16")
    # ~3.35 GiB of 4-bit linear layers + embeddings and head upcast to fp32 by k-bit preparation
    linear = quantized_bytes(shape.linear_weights(), shape.linear_rows(), "nf4", True)
    assert nf4 == linear + 4 * shape.other_params()
    assert 3.3 * 2**30 < linear < 3.4 * 2**30


def _mistral_plan(**changes):
    """The plan of an r=16 all-linear LoRA on Mistral-7B: NF4 + double quant, bf16, AdamW,
    gradient checkpointing, 2048 tokens (1024 supervised), on a GPU; ``changes`` override."""
    inputs = dict(
        shape=shape_from_config(MISTRAL_7B),
        r=16,
        targets="all-linear",
        dora=False,
        scheme="nf4",
        double_quant=True,
        dtype="bf16",
        optim="adamw_torch",
        checkpointing=True,
        tokens=2048,
        supervised=1024,
        eval_batch=1,
        eval_length=2048,
        cpu=False,
    )
    return make_plan(PlanInputs(**{**inputs, **changes}))


def test_plan_terms_and_checkpointing():
    big = dict(tokens=8192, supervised=8192, eval_batch=8, eval_length=2176)
    plan = _mistral_plan(**big)
    assert plan.trainable == 41_943_040
    assert plan.optimizer == 8 * plan.trainable
    assert plan.activations < plan.activations_other / 5
    assert plan.kv_cache == 2 * 32 * 1024 * 2 * 8 * 2176
    eight_bit = _mistral_plan(**big, optim="paged_adamw_8bit")
    assert eight_bit.optimizer == 2 * plan.trainable
    assert plan.peak > eight_bit.peak


def test_a_cpu_4bit_bf16_plan_counts_the_heads_bf16_copy():
    shape = shape_from_config(MISTRAL_7B)
    assert head_copy_bytes(shape, "nf4", "bf16", cpu=True) == 32000 * 4096 * 2
    assert head_copy_bytes(shape, "nf4", "bf16", cpu=False) == 0  # GPUs keep the fp32 head
    assert head_copy_bytes(shape, "nf4", "fp32", cpu=True) == 0
    assert head_copy_bytes(shape, "none", "bf16", cpu=True) == 0  # the head is bf16 already
    cpu, gpu = _mistral_plan(cpu=True), _mistral_plan(cpu=False)
    assert cpu.logits - gpu.logits == 32000 * 4096 * 2


def test_activations_follow_the_residual_streams_dtype():
    """bf16 LoRA keeps bf16 activations; QLoRA in bf16 keeps an fp32 residual stream (more);
    an 8-bit base keeps fp32 activations and attention, counted as fp32."""
    act = {
        (scheme, dtype): _mistral_plan(
            scheme=scheme, dtype=dtype, checkpointing=False, cpu=True
        ).activations
        for scheme in ("none", "nf4", "int8")
        for dtype in ("fp32", "bf16")
    }
    assert act["none", "bf16"] < act["nf4", "bf16"] < act["none", "fp32"]
    assert act["int8", "bf16"] == act["int8", "fp32"] == act["none", "fp32"] == act["nf4", "fp32"]


def test_dequant_scratch_is_the_largest_linear_weight_for_kbit_only():
    shape = shape_from_config(MISTRAL_7B)
    assert dequant_bytes(shape, "nf4", 2) == 4096 * 14336 * 2  # the MLP projections
    assert dequant_bytes(shape, "int8", 4) == 4096 * 14336 * 4
    assert dequant_bytes(shape, "none", 4) == 0
    nf4 = _mistral_plan(scheme="nf4")
    assert nf4.dequant == 4096 * 14336 * 2
    assert nf4.train_peak - nf4.dequant == (
        nf4.weights + nf4.lora + nf4.optimizer + nf4.grads + nf4.activations + nf4.logits
    )
    assert _mistral_plan(scheme="none").dequant == 0


# the probes compare lorakit's settings with glibc's own defaults, which a MALLOC_* variable in
# the environment would change (and lorakit then leaves alone)
GLIBC_DEFAULTS = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or any(k.startswith("MALLOC_") for k in os.environ),
    reason="glibc's malloc with its default settings only",
)


FREE_PROBE = """
import re, sys
from lorakit.device import return_freed_memory
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
if sys.argv[1] == "fixed":
    assert return_freed_memory()
block = bytearray(b"1") * (16 << 20)
del block  # default glibc: the mmap threshold rises to 16 MiB, 8 MiB blocks come from the heap
freed, kept = [], []
for _ in range(24):  # freed blocks between kept ones: holes in the heap
    freed.append(bytearray(b"1") * (8 << 20))
    kept.append(bytearray(b"1") * (8 << 20))
before = rss()
del freed
print((before - rss()) / (24 * (8 << 20)))
"""


@GLIBC_DEFAULTS
def test_freed_tensor_memory_goes_back_to_the_os():
    """What ``LORAKIT_MALLOC=return`` does on CPU: by default memory freed between live blocks
    stays in the process (and in its peak RSS); with the threshold fixed, it is returned."""

    def returned(mode: str) -> float:
        res = subprocess.run(
            [sys.executable, "-c", FREE_PROBE, mode], capture_output=True, text=True, check=True
        )
        return float(res.stdout.split()[-1])

    assert returned("fixed") > 0.9
    assert returned("default") < 0.5


KEEP_PROBE = """
import resource, sys
from lorakit.device import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = []
for _ in range(4):  # a step's large temporary (the head's probabilities): 40 MiB, above 32
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = bytearray(b"1") * (40 << 20)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[1:]))
"""


@GLIBC_DEFAULTS
def test_kept_memory_is_reused_without_page_faults():
    """What ``LORAKIT_MALLOC=keep`` (the default on CPU) buys: a large block freed and allocated
    again, as a training step does each step, comes back from the heap instead of fresh pages
    that each fault on first touch."""

    def faults(mode: str) -> int:
        res = subprocess.run(
            [sys.executable, "-c", KEEP_PROBE, mode], capture_output=True, text=True, check=True
        )
        return int(res.stdout.split()[-1])

    pages = (40 << 20) // 4096
    assert faults("keep") < pages // 20
    assert faults("default") > pages // 2


def test_malloc_modes_and_user_settings_win(monkeypatch):
    """LORAKIT_MALLOC: keep (unset) and return change glibc's thresholds, glibc leaves them; a
    MALLOC_* variable of the user's wins over both; a misspelt mode is an error naming the
    three."""
    from lorakit.device import configure_malloc, malloc_mode
    from lorakit.errors import RunError

    monkeypatch.delenv("LORAKIT_MALLOC", raising=False)
    assert malloc_mode() == "keep"
    monkeypatch.setenv("LORAKIT_MALLOC", "glibc")
    assert configure_malloc() is None
    monkeypatch.setenv("LORAKIT_MALLOC", "return")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert configure_malloc() is None and return_freed_memory() is False
    monkeypatch.setenv("LORAKIT_MALLOC", "retrun")
    with pytest.raises(RunError, match=r"keep .*return .*glibc"):
        configure_malloc()


@pytest.mark.parametrize(
    ("text", "size"), [("24GB", 24 * 2**30), ("512MiB", 512 * 2**20), ("1.5G", 3 * 2**29)]
)
def test_parse_size(text, size):
    assert parse_size(text) == size
    with pytest.raises(ValueError):
        parse_size("lots")
    with pytest.raises(ValueError, match=r"no unit; write e\.g\. 24GB"):
        parse_size("24")  # 24 bytes was never what was meant
    assert parse_size("24B") == 24


def test_plan_cli_reads_config_only_without_torch(tmp_path, tiny_model_dir, chat_file):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, quant="bnb-4bit")
    res = run_probe("plan", str(recipe), "--device-memory", "8GB", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "trainable" in res.stdout and "<- recipe" in res.stdout
    assert "fits" in res.stdout and "from the data" in res.stdout
    assert "HEAVY:\n" in res.stderr, "plan must not import torch/transformers"
    res = run_probe("plan", str(recipe), "--device-memory", "1MB", cwd=tmp_path)
    assert res.returncode == 1 and "does NOT fit" in res.stdout and "to fit:" in res.stdout


def test_plan_refuses_a_target_module_the_model_does_not_have(tmp_path, tiny_model_dir, chat_file):
    """plan printed 0 trainable parameters and exit 0 for a misspelt name that run refuses."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file)
    res = run_probe("plan", str(recipe), 'peft.target_modules=["q_projj", "v_proj"]', cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "'q_projj' in target_modules matches no module of this model" in res.stderr
    assert 'use "all-linear" or some of: down_proj, gate_proj, k_proj, lm_head' in res.stderr
    assert "HEAVY:\n" in res.stderr, "plan must not import torch/transformers"
    for ok in ('["v_proj", "lm_head"]', '["model.layers.1.mlp.down_proj"]', '["self_attn.q_proj"]'):
        res = run_probe("plan", str(recipe), f"peft.target_modules={ok}", cwd=tmp_path)
        assert res.returncode == 0, (ok, res.stderr)


def test_the_plan_s_module_names_are_the_loaded_model_s(tiny_model_dir):
    """layout_module_names lists every module of the loaded Llama layout: plan never refuses a
    name that run accepts."""
    import json

    from helpers import load_tiny_model
    from lorakit.memory_plan import shape_from_config
    from lorakit.target_modules import layout_linear_names, layout_module_names

    shape = shape_from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    model = load_tiny_model(tiny_model_dir)
    loaded = {n for n, _ in model.named_modules() if n}
    assert loaded <= set(layout_module_names(shape) or ())
    linear = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"
    }
    assert sorted(linear) == layout_linear_names()


def test_run_refuses_when_the_plan_does_not_fit(tmp_path, tiny_model_dir, chat_file, cli):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file)
    code, _out, err = cli("run", recipe, "--device-memory", "1MB")
    assert code == 2
    assert "memory plan predicts a peak of" in err and "--ignore-memory-plan" in err
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_plan_hub_model_without_hub_says_so(tmp_path, chat_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = tmp_path / "hub.toml"
    recipe.write_text(
        f'[model]\nplugin = "hub"\nid = "nobody/not-cached-model"\n'
        f'[[data.sources]]\nplugin = "chat_jsonl"\npath = "{chat_file}"\n'
    )
    res = run_probe("plan", str(recipe), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "not in the local Hub cache" in res.stderr and 'plugin = "local"' in res.stderr


@pytest.mark.slow  # it calls `lorakit run` (which stops before training)
def test_a_misspelt_malloc_mode_stops_the_run_before_it_claims_a_folder(
    tmp_path, tiny_model_dir, chat_file, cli, monkeypatch
):
    monkeypatch.setenv("LORAKIT_MALLOC", "keeep")
    code, out, err = cli("run", tiny_recipe(tmp_path, tiny_model_dir, chat_file))
    assert code != 0
    assert "LORAKIT_MALLOC='keeep' is not a memory mode" in out + err
    assert "Traceback" not in out + err
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "no run folder left behind"


@pytest.mark.slow
@pytest.mark.parametrize("quant,dtype", [("none", "fp32"), ("none", "bf16"), ("bnb-4bit", "bf16")])
def test_the_activation_fit_matches_a_measured_forward(quant, dtype, tmp_path, chat_file):
    """A shape the fit never saw (benchmarks/fit_activations.py): one layer's saved bytes per
    token, measured on lorakit's own forward (2 against 4 layers), within 3% of the plan's."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fit_activations
    from lorakit.memory_plan import activation_bytes, shape_from_config

    hidden, inter, heads, kv, lengths = 320, 896, 5, 1, [150, 120]
    measured = [
        fit_activations.saved_bytes(
            fit_activations.model_folder(tmp_path, hidden, inter, heads, kv, layers),
            quant,
            dtype,
            lengths,
            chat_file,  # the recipe needs a data source; the forward does not read it
        )
        for layers in (2, 4)
    ]
    per_layer = (measured[1] - measured[0]) / (2 * sum(lengths))
    shape = shape_from_config(
        {
            "model_type": "llama",
            "vocab_size": 49152,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": 1,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": 64,
            "tie_word_embeddings": True,
        }
    )
    elem = 4 if dtype == "fp32" else 2
    planned = activation_bytes(shape, 1, elem, False, kbit=quant != "none")
    assert abs(planned - per_layer) <= 0.03 * per_layer, (planned, per_layer)


def test_a_pair_objectives_micro_batch_holds_both_sides(tmp_path, tiny_model_dir):
    """DPO, ORPO and SimPO pack both sides of each pair into a micro-batch (each up to
    max_length): the plan counts both, from the data and in its upper bound, so a run it
    lets start is not sized for half its rows."""
    from helpers import preference_records, write_jsonl
    from lorakit.catalog import default_catalog
    from lorakit.components import build_components
    from lorakit.preflight import data_tokens, plan_recipe
    from lorakit.recipe import load_recipe

    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_records(12))
    path = tiny_recipe(tmp_path, tiny_model_dir, pairs, source="preference_jsonl")
    catalog = default_catalog()
    sft = load_recipe(path, (), catalog)  # the chosen conversations only
    one_side, _, _, _ = data_tokens(sft, build_components(sft, catalog))
    for objective in ("dpo", "orpo", "simpo"):
        recipe = load_recipe(path, (f'train.objective="{objective}"',), catalog)
        components = build_components(recipe, catalog)
        tokens, supervised, note, _ = data_tokens(recipe, components)
        assert "pairs, both sides" in note
        # both sides of the same 4 pairs: about twice the chosen side alone (rejected answers
        # are near misses of the same length), never over the two-sided bound
        assert 1.8 * one_side <= tokens <= 2 * 4 * 64, (objective, tokens, one_side)
        assert 0 < supervised < tokens
        bound, _ = plan_recipe(recipe, components, "cpu", read_data=False)
        assert bound.inputs.tokens == 2 * 4 * 64
    kto = load_recipe(path, ('train.objective="kto"',), catalog)  # one answer a row
    bound, _ = plan_recipe(kto, build_components(kto, catalog), "cpu", read_data=False)
    assert bound.inputs.tokens == 4 * 64
    res = run_probe("plan", str(path), 'train.objective="dpo"', cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "pairs, both sides" in res.stdout
    assert "HEAVY:\n" in res.stderr, "plan must not import torch/transformers"


@pytest.mark.slow
def test_plan_with_from_adapter_counts_the_adapters_own_shape(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """A from_adapter run trains the adapter it loads, with that adapter's r and targets;
    plan (and run's start-up check) counted [peft]'s instead (r=64: 16x the parameters)."""
    import re

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "sft"')
    assert cli("run", recipe, "train.max_steps=1")[0] == 0
    own = run_probe("plan", str(recipe), cwd=tmp_path)
    assert own.returncode == 0, own.stderr
    res = run_probe("plan", str(recipe), 'train.from_adapter="runs/sft"', "peft.r=64", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "HEAVY:\n" in res.stderr, "plan must not import torch/transformers"

    def trainable(out: str) -> str:
        return re.search(r"([\d,]+) trainable", out).group(1)  # type: ignore[union-attr]

    assert trainable(res.stdout) == trainable(own.stdout), res.stdout
    assert "r=64" not in res.stdout and "train.from_adapter's own" in res.stdout, res.stdout
    wide = run_probe("plan", str(recipe), "peft.r=64", cwd=tmp_path)
    assert trainable(wide.stdout) != trainable(own.stdout)
