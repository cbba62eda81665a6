"""The packing isolation probe (issue 24): an architecture whose layers carry one example of a
packed row into the next is refused before the first step; one that keeps them apart passes,
once, and is recorded."""

from __future__ import annotations

import json

import pytest
from helpers import chat_records, tiny_recipe, write_jsonl
from lorakit.errors import ModelError
from lorakit.packing_probe import VERIFIED, cache_file, check_packing, probe
from lorakit.sections import TrainSection

pytestmark = pytest.mark.slow  # builds models from configs and runs them

SIZES = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def tiny(model_type: str, dtype: str = "fp32"):
    """A tiny random model of ``model_type`` with lorakit's packed attention switched on."""
    import torch
    import transformers
    from lorakit.attention import use_packed_attention

    if model_type == "lfm2":  # LiquidAI LFM2: short convolutions between attention layers
        config = transformers.Lfm2Config(**SIZES, layer_types=["conv", "full_attention"])
    elif model_type == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=256
        )
    else:
        config = transformers.AutoConfig.for_model(model_type, **SIZES)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).train()
    use_packed_attention(model, "cpu")
    return model


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("model_type", sorted({t for t, _ in VERIFIED}))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_probe_passes_on_every_built_in_verified_architecture(model_type, dtype):
    model = tiny(model_type, dtype)
    assert probe(model) is None
    assert model.training, "the probe gives the model back in the mode it found it"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_probe_finds_the_leak_of_a_conv_hybrid(dtype):
    # LFM2's attention layers honour the packed boundaries; its conv layers do not, so the
    # model passes use_packed_attention and would train contaminated without the probe
    leak = probe(tiny("lfm2", dtype))
    assert leak is not None and leak > 0


def test_a_leaking_architecture_is_refused_with_the_way_out():
    with pytest.raises(ModelError) as caught:
        check_packing(TrainSection(), tiny("lfm2"))
    err = caught.value
    assert "lfm2" in str(err) and "leak" in str(err)
    assert "train.per_device_train_batch_size=1" in err.fix and "train.packing=false" in err.fix
    assert not cache_file().exists(), "a failure is never recorded"


def test_one_example_per_row_needs_no_probe():
    one = TrainSection(per_device_train_batch_size=1, per_device_eval_batch_size=1, packing=False)
    check_packing(one, tiny("lfm2"))  # nothing packed together: nothing to refuse


def test_a_passing_architecture_is_probed_once_and_recorded(monkeypatch):
    # GPT-2 (absolute positions) is not built in; under transformers 5 its attention goes
    # through the AttentionInterface and position_ids restart per example, so it passes
    model = tiny("gpt2")
    lines: list[str] = []
    check_packing(TrainSection(), model, lines.append)
    assert len(lines) == 1 and "gpt2" in lines[0], lines
    recorded = json.loads(cache_file().read_text())
    assert [k.split("|")[:2] for k in recorded] == [["gpt2", "lorakit_varlen"]]

    def no_probe(model):
        raise AssertionError("probed again")

    monkeypatch.setattr("lorakit.packing_probe.probe", no_probe)
    check_packing(TrainSection(), model, lines.append)
    assert len(lines) == 1


def _save_tiny_lfm2(folder):
    from helpers import build_tiny_model
    from transformers import AutoTokenizer

    tok_dir = build_tiny_model(folder / "llama")  # for its trained BPE tokenizer
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    import torch
    import transformers

    config = transformers.Lfm2Config(
        **{**SIZES, "vocab_size": len(tok)},
        layer_types=["conv", "full_attention"],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    out = folder / "lfm2"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_a_run_on_a_leaking_architecture_stops_before_its_first_step(tmp_path, cli):
    model_dir = _save_tiny_lfm2(tmp_path)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(16))
    recipe = tiny_recipe(tmp_path, model_dir, data)
    code, _, err = cli("run", recipe, "train.max_steps=2")
    assert code == 2, err
    assert "packed rows leak between examples" in err and "lfm2" in err
    assert not list((tmp_path / "runs" / "recipe").glob("checkpoints/checkpoint-*"))
    # the fix the message gives trains: one example per row
    fix = ["train.per_device_train_batch_size=1", "train.per_device_eval_batch_size=1"]
    code, _, err = cli("run", recipe, "train.max_steps=2", "output.name=one", *fix)
    assert code == 0, err
    assert (tmp_path / "runs" / "one" / "adapter" / "adapter_model.safetensors").is_file()


def test_probe_on_the_gpu_paths():
    """On CUDA the probe runs the one-call paths (flash varlen in bf16, the block mask in
    fp32): an isolated model must still give bit-identical logits there. Skips without CUDA."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from lorakit.attention import packed_attention

    for dtype in ("bf16", "fp32"):
        for model_type, passes in (("llama", True), ("lfm2", False)):
            model = tiny(model_type, dtype).cuda()
            with packed_attention(model, "cuda"):
                assert (probe(model) is None) == passes, (model_type, dtype)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_a_preference_run_on_a_leaking_architecture_stops_before_its_reference_pass(
    tmp_path, cli, monkeypatch, objective
):
    """A pair's answers share a row whatever the batch sizes (KTO: an answer and its
    mismatched row), and the reference pass packs several pairs: with one example per row
    set, a leaking architecture is still refused, before anything is scored."""
    from helpers import preference_records, unpaired_records, with_preference_source

    with_preference_source(monkeypatch)
    model_dir = _save_tiny_lfm2(tmp_path)
    records = preference_records(16) if objective == "dpo" else unpaired_records(16)
    data = write_jsonl(tmp_path / "prefs.jsonl", records)
    recipe = tiny_recipe(tmp_path, model_dir, data, source="preference_jsonl")
    size = 1 if objective == "dpo" else 2  # KTO's mismatched rows need two answers a batch
    one = [f"train.per_device_train_batch_size={size}", "train.per_device_eval_batch_size=1"]
    code, _, err = cli("run", recipe, "train.max_steps=2", f'train.objective="{objective}"', *one)
    assert code == 2, err
    assert "packed rows leak between examples" in err and f"objective '{objective}'" in err
    assert 'objective = "sft"' in err, "the way out"
    assert "reference log-probabilities of" not in err, "refused before the reference pass"
    assert "Traceback" not in err
