"""RMSNorm as one autograd node (``lorakit.fused_norm``): transformers' forward bit for bit,
its gradient to the dtype's rounding, for 16-bit inputs and only where the class computes exactly that norm, and
still in place after ``train()``/``eval()`` (transformers re-kernelizes its layers then)."""

from __future__ import annotations

import pytest
import torch
from lorakit.fused_norm import RmsNorm, use_fused_norm
from transformers.models.llama.modeling_llama import LlamaRMSNorm


def _norm(width: int = 96, dtype: torch.dtype = torch.float32) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(width, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(width, generator=torch.Generator().manual_seed(1)))
    norm.weight.requires_grad_(False)
    return norm.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_node_is_transformers_norm_forward_bit_for_bit_and_its_gradient(dtype):
    norm = _norm(dtype=dtype)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 37, 96, generator=g) * 4 + 0.3).to(dtype)
    up = torch.randn(2, 37, 96, generator=g).to(dtype)
    theirs_x, mine_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    theirs = LlamaRMSNorm.forward(norm, theirs_x)
    mine = RmsNorm.apply(mine_x, norm.weight, norm.variance_epsilon)
    assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)
    theirs.backward(up)
    mine.backward(up)
    # the same derivative summed in another order: fp32 to ~1e-6, bf16 to a rounding step
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    scale = theirs_x.grad.float().abs().max()
    assert (mine_x.grad.float() - theirs_x.grad.float()).abs().max() <= tol * scale
    # and the gradient is right, not only like autograd's: against float64
    x64 = x.double().requires_grad_(True)
    w64 = norm.weight.double()
    (w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)).backward(up.double())
    assert (mine_x.grad.double() - x64.grad).abs().max() <= 2 * tol * scale


def test_a_model_uses_it_while_training_and_keeps_it_through_train_and_eval(tiny_model_dir):
    from helpers import load_tiny_model

    model = load_tiny_model(tiny_model_dir).to(torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.tensor([[5, 9, 23, 41, 7, 3, 77, 12]])
    before = model(ids).logits
    assert use_fused_norm(model) == 5  # two per layer and the final norm
    calls = []
    original = RmsNorm.apply

    def counted(*args):
        calls.append(1)
        return original(*args)

    RmsNorm.apply = counted  # type: ignore[method-assign]
    try:
        model.train()
        model.eval()
        model.train()  # transformers re-kernelizes at each switch: the class stays
        embeds = model.get_input_embeddings()(ids).requires_grad_(True)
        trained = model(inputs_embeds=embeds).logits
        assert len(calls) == 5
        with torch.no_grad():  # evaluation: the class's own forward
            model(ids)
        assert len(calls) == 5
        model.float()  # fp32 (a CPU without bf16, QLoRA's residual stream): its own forward too
        model(inputs_embeds=model.get_input_embeddings()(ids).requires_grad_(True))
        assert len(calls) == 5
        model.to(torch.bfloat16)
    finally:
        RmsNorm.apply = original  # type: ignore[method-assign]
    model.eval()
    assert torch.equal(model(ids).logits, before)
    assert torch.equal(trained, before), "dropout-free training forward: the same bits"
    assert use_fused_norm(model) == 5, "idempotent"


def test_other_norms_and_trainable_weights_keep_their_own_forward():
    class GemmaLikeRMSNorm(torch.nn.Module):  # another function: 1 + weight
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(16), requires_grad=False)
            self.variance_epsilon = 1e-6

        def forward(self, x):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (h * (1.0 + self.weight.float())).to(x.dtype)

    other, llama = GemmaLikeRMSNorm(), _norm(16)
    assert use_fused_norm(torch.nn.ModuleList([other, llama])) == 1
    assert type(other) is GemmaLikeRMSNorm and type(llama) is not LlamaRMSNorm
    llama.weight.requires_grad_(True)  # a norm that trains: the class's forward, its gradient
    llama(torch.randn(3, 16)).sum().backward()
    assert llama.weight.grad is not None
