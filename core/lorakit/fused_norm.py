"""RMSNorm as one autograd node (CPU training).

transformers' ``LlamaRMSNorm`` (and Mistral's, Qwen2's, ...: the same code) computes

    h = x.float();  r = rsqrt(mean(h**2) + eps);  y = weight * (h * r).to(x.dtype)

in five eager operations, and autograd records each. Its backward then makes about eight passes
over the ``[tokens, hidden]`` activations (the gradients of the product ``h * r``, of the mean of
squares and of the two casts, added up), and it keeps the fp32 copy ``h`` for them: twice a bf16
input's memory, for each of a model's two norms per layer. :class:`RmsNorm` runs the same
forward, the same operations in the same order, so its output is transformers' bit for bit, and
keeps only the input and the per-token ``r``. Its backward is the closed form

    dx = r * (g - h * r**2 * mean(g * h)),  g = (dy * weight) in fp32

in four passes: the same derivative summed in another order, so the input gradients agree with
autograd's to the compute dtype's rounding (``tests/test_fused_norm.py``). On the 135M model's
bf16 step that was +6-7% tokens/s and 8% less saved activation memory (docs/performance.md).

It is used for 16-bit inputs only (bf16, fp16). An fp32 input needs no copy (``x.float()`` is
``x``), the node gained 1% there, and its other summation order would still move a training
run's last bits: fp32 runs (a CPU without bf16, QLoRA's fp32 residual stream) keep computing
exactly what they did.

:func:`use_fused_norm` gives a model's norms a subclass whose forward is this node while
autograd records (it is the class's own forward otherwise: evaluation, no_grad), after checking
per class that the class computes exactly this forward (its output equals :class:`RmsNorm`'s bit
for bit on a test input, fp32 and bf16); other norms (Gemma's ``1 + weight``, LayerNorm) keep
their own. A subclass, not a forward set on the instance: transformers re-kernelizes its layers
at every ``train()``/``eval()`` (the ``kernels`` package), which removes instance forwards. A
norm whose weight trains keeps the class's forward: this node gives no weight gradient.
"""

from __future__ import annotations

from typing import Any

import torch


class RmsNorm(torch.autograd.Function):
    """``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``; no weight
    gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.to(torch.float32)
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, r, weight)
        return weight * (h * r).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, r, weight = ctx.saved_tensors
        g = (grad * weight).to(torch.float32)
        h = x.to(torch.float32)
        # mean(g * h) per token, times r**2: the part of g along h that normalizing removes
        along = torch.linalg.vecdot(g, h).unsqueeze(-1).div_(h.shape[-1]).mul_(r).mul_(r)
        return torch.addcmul(g, h, along, value=-1.0).mul_(r).to(x.dtype), None, None


def _fused_forward(self: Any, hidden_states: torch.Tensor) -> Any:
    parent: Any = type(self).__mro__[1]  # the class it was given (use_fused_norm)
    if (
        self.weight.requires_grad
        or not torch.is_grad_enabled()
        or hidden_states.dtype == torch.float32  # no fp32 copy to spare; see the module doc
    ):
        return parent.forward(self, hidden_states)
    return RmsNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _computes_rms_norm(module: Any) -> bool:
    """Does this norm's class compute :class:`RmsNorm`'s output bit for bit (fp32 and bf16
    inputs, the module's own weight and eps)?"""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return False
    if any(True for _ in module.children()) or len(list(module.parameters())) != 1:
        return False
    probe = torch.randn(3, 5, weight.shape[0], generator=torch.Generator().manual_seed(0))
    probe = probe * 3 + 0.5
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            x = probe.to(dtype=dtype, device=weight.device)
            mine = RmsNorm.apply(x, weight, eps)
            theirs = type(module).forward(module, x)
            if not isinstance(theirs, torch.Tensor) or theirs.dtype != mine.dtype:
                return False
            if not torch.equal(theirs, mine):
                return False
    return True


_FUSED: dict[type, type] = {}


def _fused_class(kind: type) -> type:
    if kind not in _FUSED:
        _FUSED[kind] = type(f"Fused{kind.__name__}", (kind,), {"forward": _fused_forward})
    return _FUSED[kind]


def use_fused_norm(model: Any) -> int:
    """Give every RMSNorm of ``model`` whose class computes :class:`RmsNorm`'s forward the fused
    subclass; return how many norms use it."""
    checked: dict[type, bool] = {}
    switched = 0
    for module in model.modules():
        kind = type(module)
        if kind in _FUSED.values():
            switched += 1
            continue
        if not kind.__name__.lower().endswith("rmsnorm"):
            continue
        if kind not in checked:
            checked[kind] = _computes_rms_norm(module)
        if checked[kind]:
            module.__class__ = _fused_class(kind)
            switched += 1
    return switched
