"""LoRA's training step in one autograd function per layer, in the base's compute dtype (CPU).

PEFT's ``lora.Linear.forward`` is written for every case (several adapters, DoRA, mixed
batches): per layer and step it casts the input to the adapter's fp32, draws a dropout mask,
runs two thin fp32 matmuls, scales, adds an fp32 result to the base output (a new fp32 tensor)
and casts back; autograd then records a node for each of those. On a CPU with fast bf16 the
base matmuls are cheap, and those conversions and elementwise passes are a large share of the
step. :class:`LoraDelta` computes the same function in one node:

    delta = scale * (dropout(x) @ A.T) @ B.T

in the dtype the base layer computes in (bf16 on such CPUs, fp32 elsewhere), with a backward
that reuses the dropped-out input and the rank-r activations it saved. The adapter weights and
their gradients stay fp32 (the optimizer's master copy): they are cast to the compute dtype for
the matmuls, which accumulate in fp32 inside oneDNN and round their output once, as autocast
does. Dropout masks come from :class:`lorakit.fast_dropout.FastDropout`, drawn in the same order
as before, so runs stay seeded and resume bit-identical.

:func:`use_fused_lora` switches the layers of a PEFT model to it. A layer falls back to PEFT's
own forward for everything this does not cover: eval mode, several or no active adapters,
merged weights, DoRA and other variants, a LoRA bias, ``adapter_names``, nn.Dropout.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from lorakit.fast_dropout import FastDropout


class LoraDelta(torch.autograd.Function):
    """``scale * (dropout(x) @ a.T) @ b.T`` in ``x``'s dtype; ``a``, ``b`` fp32 parameters.

    In fp32 it computes what PEFT's layer computes, bit for bit (``tests/test_fused_lora.py``).
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, drop: Any
    ) -> torch.Tensor:
        dtype = x.dtype
        a_c, b_c = a.to(dtype), b.to(dtype)
        flat = x.reshape(-1, x.shape[-1])
        keep = None
        if drop is not None:
            keep = drop.keep_mask(flat.shape, flat.device)
            flat = torch.where(keep, flat * drop.scale, 0.0)
        h = flat @ a_c.t()  # [tokens, r]
        out = torch.mm(h, b_c.t()).mul_(scale)
        ctx.save_for_backward(flat, h, a_c, b_c, keep)
        ctx.scale = scale
        ctx.drop_scale = drop.scale if drop is not None else 1.0
        ctx.x_shape = x.shape
        ctx.param_dtypes = (a.dtype, b.dtype)
        return out.view(*x.shape[:-1], b.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        flat, h, a_c, b_c, keep = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(flat.dtype)
        g_h = torch.mm(g, b_c).mul_(ctx.scale)  # [tokens, r]
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[2]:
            grad_b = torch.mm(g.t(), h).mul_(ctx.scale).to(ctx.param_dtypes[1])
        if ctx.needs_input_grad[1]:
            grad_a = torch.mm(g_h.t(), flat).to(ctx.param_dtypes[0])
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g_h, a_c)
            if keep is not None:
                grad_x = torch.where(keep, grad_x * ctx.drop_scale, 0.0)
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_a, grad_b, None, None


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A PEFT LoRA layer's forward through :class:`LoraDelta`, or PEFT's own where it differs."""
    name = _fusable_adapter(self, args, kwargs)
    if name is None:
        return self._lorakit_peft_forward(x, *args, **kwargs)
    result = self.base_layer(x)
    drop = self.lora_dropout[name]
    delta = LoraDelta.apply(
        x,
        self.lora_A[name].weight,
        self.lora_B[name].weight,
        self.scaling[name],
        drop if isinstance(drop, FastDropout) and drop.threshold else None,
    )
    return result + delta.to(result.dtype)


def _fusable_adapter(layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    if args or kwargs or not layer.training or layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if layer.lora_B[name].bias is not None:
        return None
    drop = layer.lora_dropout[name]
    if not isinstance(drop, (FastDropout, torch.nn.Identity)):
        return None
    return str(name)


def use_fused_lora(model: Any) -> int:
    """Give every PEFT LoRA linear layer of ``model`` the fused training forward; return how
    many. Its parameters, their names and the saved adapter stay exactly PEFT's."""
    from peft.tuners.lora import LoraLayer

    fused = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
            continue
        if type(module).__name__ not in ("Linear", "Linear4bit", "Linear8bitLt"):
            continue  # embeddings, convolutions: PEFT's own
        layer: Any = module
        if "_lorakit_peft_forward" in vars(layer):
            continue
        layer._lorakit_peft_forward = layer.forward
        layer.forward = types.MethodType(_fused_forward, layer)
        fused += 1
    return fused
