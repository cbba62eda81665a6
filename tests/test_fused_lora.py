"""The fused LoRA training forward computes PEFT's LoRA layer (``lorakit.fused_lora``)."""

from __future__ import annotations

import pytest
from helpers import build_tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def _lora_model(folder, dtype, fused: bool, **lora):
    import torch
    from lorakit.fast_dropout import use_fast_dropout
    from lorakit.fused_lora import use_fused_lora
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    torch.manual_seed(0)
    config = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "all-linear"}
    model = get_peft_model(base, LoraConfig(**{**config, **lora}))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0: give the adapter something to compute
            torch.nn.init.normal_(p, std=0.1)
    use_fast_dropout(model)
    swapped = use_fused_lora(model) if fused else 0
    return model.train(), swapped


def _step(model):
    """Logits and LoRA gradients of one seeded forward/backward (dropout masks included)."""
    import torch

    torch.manual_seed(1)
    ids = torch.randint(0, 300, (2, 20))
    logits = model(input_ids=ids).logits.float()
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("compute_dtype", ["fp32", "bf16"])
def test_fused_layers_compute_what_peft_computes(tiny, compute_dtype):
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[compute_dtype]
    (peft, _), (fused, swapped) = (_lora_model(tiny, dtype, f) for f in (False, True))
    assert swapped == 14  # 7 linear layers x 2 decoder layers
    ref_logits, ref_grads = _step(peft)
    logits, grads = _step(fused)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    if compute_dtype == "fp32":
        # same operations in the same order, same dropout masks: bit for bit
        assert logits.equal(ref_logits)
        assert all(grads[k].equal(ref_grads[k]) for k in grads)
        return
    # bf16: the fused path computes the rank-r product in bf16 (PEFT casts to fp32 and back):
    # outputs agree to a few bf16 ulps (2^-8 relative each), gradients to a few percent of
    # their largest element; the gradients stay fp32 tensors for the fp32 master weights
    assert (logits - ref_logits).abs().max() <= 4 * 2**-8 * ref_logits.abs().max()
    for k, g in grads.items():
        assert g.dtype == torch.float32
        assert (g - ref_grads[k]).abs().max() <= 0.1 * ref_grads[k].abs().max(), k


def test_layers_fall_back_to_peft_where_fusion_does_not_apply(tiny):
    """Eval mode, a disabled adapter and DoRA go through PEFT's own forward."""
    import torch

    model, swapped = _lora_model(tiny, torch.float32, True, use_dora=True)
    assert swapped == 14
    reference, _ = _lora_model(tiny, torch.float32, False, use_dora=True)
    assert _step(model)[0].equal(_step(reference)[0]), "DoRA: PEFT's forward"
    ids = torch.tensor([[3, 4, 5, 6]])
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert model(input_ids=ids).logits.equal(reference(input_ids=ids).logits)
        with model.disable_adapter(), reference.disable_adapter():
            assert model(input_ids=ids).logits.equal(reference(input_ids=ids).logits)
