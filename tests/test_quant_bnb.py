"""bitsandbytes 4-bit layers as lorakit loads them: they stay on the differentiable path.

On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` for a bf16 inference kernel
the first time it runs in eval mode without gradients, in place; after that the layer has no
backward and ignores the fp32 compute dtype. These tests pass on any CPU; on one without
AVX512-BF16 the conversion never happens in the first place.
"""

from __future__ import annotations

import pytest
from helpers import assert_reproduces_bf16_training, tiny_recipe

pytestmark = pytest.mark.slow


def _four_bit_layers(model) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _packed(layer) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def _load(tmp_path, tiny_model_dir, chat_file, dtype="fp32"):
    from lorakit.catalog import default_catalog
    from lorakit.components import build_components
    from lorakit.modeling import load_base_model, resolve_model
    from lorakit.recipe import load_recipe

    recipe = load_recipe(
        tiny_recipe(tmp_path, tiny_model_dir, chat_file, quant="bnb-4bit", dtype=dtype)
    )
    parts = build_components(recipe, default_catalog())
    return parts, load_base_model(resolve_model(parts.model_source), parts.quant, "cpu")


def test_eval_forward_keeps_4bit_layers_trainable(
    tmp_path, tiny_model_dir, chat_file, compute_dtype
):
    """In every compute dtype: bitsandbytes repacks only where bf16 is the compute dtype on an
    AVX512-BF16 CPU, so the bf16 case is the one that matters on such machines."""
    import torch

    _, model = _load(tmp_path, tiny_model_dir, chat_file, compute_dtype)
    layers = _four_bit_layers(model)
    assert layers, "the recipe must load a 4-bit model"
    expected = {"fp32": torch.float32, "bf16": torch.bfloat16}[compute_dtype]
    assert {m.compute_dtype for m in layers} == {expected}
    # what bitsandbytes leaves unquantized is fp32, as peft's k-bit preparation trains it
    assert model.get_input_embeddings().weight.dtype == torch.float32
    model.eval()
    with torch.no_grad():
        before = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
        again = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert not any(_packed(m) for m in layers), "an eval forward must not repack the weights"
    assert before.dtype == torch.float32 and before.equal(again)

    # After evaluation, gradients still flow through the frozen 4-bit layers to their input.
    model.train()
    layer = layers[0]
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_training_refuses_an_already_repacked_model(tmp_path, tiny_model_dir, chat_file):
    functional = pytest.importorskip("bitsandbytes.functional")
    convert = getattr(functional, "_convert_weight_packed_for_cpu", None)
    if convert is None:
        pytest.skip("this bitsandbytes has no CPU inference repacking")
    parts, model = _load(tmp_path, tiny_model_dir, chat_file)
    layer = _four_bit_layers(model)[0]
    layer.weight.data, layer.weight.quant_state = convert(
        layer.weight.data, layer.weight.quant_state
    )
    with pytest.raises(RuntimeError, match="load the model again"):
        parts.quant.prepare_for_training(model, gradient_checkpointing=False)


def test_4bit_model_on_cpu_lets_go_of_the_weights_file(tmp_path, tiny_model_dir, chat_file):
    """Unquantized tensors left as views of the mapped checkpoint would keep every page read
    while quantizing in the run's RSS (``lorakit.modeling.release_weights_file``)."""
    from lorakit.modeling import _file_mappings

    _, model = _load(tmp_path, tiny_model_dir, chat_file)
    assert _four_bit_layers(model)
    mapped = _file_mappings()
    in_file = [
        name
        for name, p in model.named_parameters()
        if any(a <= p.untyped_storage().data_ptr() < b for a, b in mapped)
    ]
    assert in_file == []
    assert model.get_input_embeddings().weight.is_floating_point()


def test_dequantized_merge_reproduces_the_trained_model_in_each_dtype(
    tmp_path, tiny_model_dir, chat_file, cli, compute_dtype
):
    """``export --merge --merge-base dequantized`` of a QLoRA run trained in fp32 or bf16
    compute: the merge equals the trained weights (fp32 noise), in whichever dtype it trained."""
    import json

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, quant="bnb-4bit", dtype=compute_dtype)
    assert cli("run", recipe, "train.max_steps=2", "output.name=q")[0] == 0
    run = tmp_path / "runs" / "q"
    code, _, err = cli("export", run, "--merge", "--merge-base", "dequantized")
    assert code == 0, err
    parity = json.loads((run / "export" / "parity.json").read_text())
    rows = parity["comparisons"]
    assert parity["reference"] == "bnb-4bit base + adapter (as trained)"
    if compute_dtype == "fp32":
        assert "as_trained_fp32" not in rows
        assert rows["merged"]["max_abs_logit_diff"] < 5e-4, rows
    else:
        assert_reproduces_bf16_training(rows)


def test_a_bf16_4bit_model_attends_and_scores_in_bf16(
    tmp_path, tiny_model_dir, chat_file, compute_dtype
):
    """QLoRA keeps fp32 activations; where the 4-bit layers compute in bf16, attention and the
    head's matmul do too (as in a bf16 LoRA run), and nowhere else."""
    import torch
    from lorakit.attention import matmul_dtype, varlen_sdpa
    from lorakit.fused_head import head_matmul_dtype, plain_head

    _, model = _load(tmp_path, tiny_model_dir, chat_file, compute_dtype)
    low = torch.bfloat16 if compute_dtype == "bf16" else None
    head = plain_head(model)
    assert head is not None and head.weight.dtype == torch.float32
    assert head_matmul_dtype(model, head) == low
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    heads, kv = attn.config.num_attention_heads, attn.config.num_key_value_heads
    q = torch.randn(1, heads, 150, attn.head_dim, generator=g, requires_grad=True)
    k = torch.randn(1, kv, 150, attn.head_dim, generator=g, requires_grad=True)
    v = torch.randn(1, kv, 150, attn.head_dim, generator=g, requires_grad=True)
    assert matmul_dtype(attn, q) == low
    assert matmul_dtype(attn, q.detach().to(torch.bfloat16)) is None
    cu = torch.tensor([0, 40, 150])
    out, _ = varlen_sdpa(attn, q, k, v, None, scaling=attn.scaling, cu_seq_lens_q=cu)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32

    class Plain(torch.nn.Module):  # an attention module without 4-bit projections
        pass

    args = [t.detach().to(low or torch.float32) for t in (q, k, v)]
    ref, _ = varlen_sdpa(Plain(), *args, None, scaling=attn.scaling, cu_seq_lens_q=cu)
    assert out.detach().equal(ref.float())
