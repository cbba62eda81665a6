"""lorakit's chunked 4-bit quantization on CPU gives bitsandbytes' own bytes (quantize_cpu.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_recipe

pytest.importorskip("bitsandbytes")

from lorakit import quantize_cpu

OP = "bitsandbytes::quantize_4bit"


def _bitsandbytes(A, blocksize, quant_type, storage=torch.uint8):
    return torch.ops.bitsandbytes.quantize_4bit.default(A, blocksize, quant_type, storage)


def _lorakit_kernel_installed() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU")


def _assert_same(want, got):
    assert want[0].dtype == got[0].dtype and want[0].shape == got[0].shape
    assert torch.equal(want[0].view(torch.uint8), got[0].view(torch.uint8)), "packed codes differ"
    assert quantize_cpu._same(want[1], got[1]), "absmax differs"


def test_the_check_against_bitsandbytes_passes_with_this_bitsandbytes():
    """Else lorakit silently keeps bitsandbytes' kernel: correct, but 4x slower."""
    assert quantize_cpu._matches_bitsandbytes()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_many_chunks_and_a_short_last_block_give_bitsandbytes_bytes(monkeypatch, quant_type, dtype):
    monkeypatch.setattr(quantize_cpu, "CHUNK_BLOCKS", 3)  # 58 whole blocks: 20 chunks
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn(37, 101, generator=generator) * 0.03).to(dtype)  # 3737 = 58 x 64 + 25
    weight[5, :64] = 0.0
    weight[20, 7] = float("inf")  # one block through bucketize, the others compared
    want = _bitsandbytes(weight, 64, quant_type)
    assert not _lorakit_kernel_installed()
    with quantize_cpu.chunked_4bit_quantization():
        assert _lorakit_kernel_installed()
        _assert_same(want, _bitsandbytes(weight, 64, quant_type))
        with quantize_cpu.chunked_4bit_quantization():  # nested: installed once
            _assert_same(want, _bitsandbytes(weight, 64, quant_type))
        assert _lorakit_kernel_installed(), "the inner block took the outer one's kernel away"
    assert not _lorakit_kernel_installed()
    assert quantize_cpu._buffers == {}, "the scratch buffers outlived the block"


def test_a_kernel_that_differs_from_bitsandbytes_is_not_installed(monkeypatch):
    """Bin edges one float step higher: values on an edge land in another bin. The check at
    install time must see it and leave bitsandbytes' kernel in place."""
    true_bounds = quantize_cpu._bounds

    def shifted(quant_type):
        edges, order = true_bounds(quant_type)
        return torch.nextafter(edges, torch.full_like(edges, 2.0)), order

    monkeypatch.setattr(quantize_cpu, "_bounds", shifted)
    monkeypatch.setattr(quantize_cpu, "_verified", None)
    with quantize_cpu.chunked_4bit_quantization():
        assert not _lorakit_kernel_installed()
    assert quantize_cpu._verified is False


@pytest.mark.slow
def test_a_4bit_load_gives_the_model_bitsandbytes_gives(
    monkeypatch, tmp_path, tiny_model_dir, chat_file
):
    """``load_base_model`` (chunked kernel, ``device.loading_memory``) against transformers'
    own 4-bit load of the same checkpoint with the same settings: every quantized byte, block
    maximum and double-quantization constant the same."""
    import bitsandbytes as bnb
    from lorakit.catalog import default_catalog
    from lorakit.components import build_components
    from lorakit.modeling import load_base_model, resolve_model
    from lorakit.recipe import load_recipe
    from transformers import AutoModelForCausalLM

    calls = []
    chunked = quantize_cpu.quantize_4bit

    def counted(*args):
        calls.append(args[0].shape)
        return chunked(*args)

    monkeypatch.setattr(quantize_cpu, "quantize_4bit", counted)
    monkeypatch.setattr(quantize_cpu, "_verified", True)
    recipe = load_recipe(tiny_recipe(tmp_path, tiny_model_dir, chat_file, quant="bnb-4bit"))
    parts = build_components(recipe, default_catalog())
    ref = resolve_model(parts.model_source)
    ours = load_base_model(ref, parts.quant, "cpu")
    assert calls, "lorakit's kernel did not quantize the model"
    theirs = AutoModelForCausalLM.from_pretrained(
        ref.path, device_map={"": "cpu"}, **parts.quant.load_kwargs("cpu")
    )
    pairs = [
        (a, b)
        for a, b in zip(ours.modules(), theirs.modules(), strict=True)
        if isinstance(a, bnb.nn.Linear4bit)
    ]
    assert len(pairs) == len(calls)
    for a, b in pairs:
        assert torch.equal(a.weight.data, b.weight.data)
        qa, qb = a.weight.quant_state, b.weight.quant_state
        assert torch.equal(qa.absmax, qb.absmax)
        if qb.nested:
            assert torch.equal(qa.offset, qb.offset)
            assert torch.equal(qa.state2.absmax, qb.state2.absmax)
