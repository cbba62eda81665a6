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

Over a bitsandbytes 4-bit layer (QLoRA) the base layer joins that node (:class:`Lora4bit`),
and 4-bit layers without an adapter get one of their own (:class:`Base4bit`). bitsandbytes
computes them right but spends a QLoRA step's time on passes around the matmul: each layer
converts its fp32 input to the compute dtype (q, k and v convert the same tensor three times),
converts its output back before the LoRA delta is added, and its backward dequantizes the
weight to fp32 and converts it (a pass over the whole weight). Here the input is converted once
(:class:`_SharedCast`), the bf16 base output and input gradient are added to the fp32 LoRA
terms in one pass, and the weight is dequantized straight to the compute dtype. The outputs
are bitsandbytes' and PEFT's bit for bit (the same dequantized values, the same matmuls).

:func:`use_fused_lora` switches the layers of a PEFT model to it. A layer falls back to PEFT's
(or bitsandbytes') own forward for everything this does not cover: eval mode, several or no
active adapters, merged weights, DoRA and other variants, a LoRA bias, ``adapter_names``,
nn.Dropout, a 4-bit layer repacked for inference or with a bias that trains.
"""

from __future__ import annotations

import contextlib
import copy
import types
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from lorakit.fast_dropout import FastDropout, ones_where_kept


class LoraDelta(torch.autograd.Function):
    """``scale * (dropout(x) @ a.T) @ b.T`` in ``x``'s dtype; ``a``, ``b`` fp32 parameters.

    In fp32 it computes what PEFT's layer computes, bit for bit (``tests/test_fused_lora.py``).
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, drop: Any
    ) -> torch.Tensor:
        return _delta_forward(ctx, x, a, b, scale, drop)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        return (*_delta_backward(ctx, grad, need_x, need_a, need_b), None, None)


def _delta_forward(
    ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, drop: Any
) -> torch.Tensor:
    dtype = x.dtype
    a_c, b_c = a.to(dtype), b.to(dtype)
    flat = x.reshape(-1, x.shape[-1])
    keep = None
    if drop is not None:
        keep = drop.keep_bytes(flat.shape, flat.device)  # kept as bytes, not the dtype's size
        flat = (flat * drop.scale).mul_(ones_where_kept(keep, dtype))
    h = flat @ a_c.t()  # [tokens, r]
    out = torch.mm(h, b_c.t()).mul_(scale)
    ctx.save_for_backward(flat, h, a_c, b_c, keep)
    ctx.scale = scale
    ctx.drop_scale = drop.scale if drop is not None else 1.0
    ctx.x_shape = x.shape
    ctx.param_dtypes = (a.dtype, b.dtype)
    return out.view(*x.shape[:-1], b.shape[0])


def _delta_backward(
    ctx: Any, grad: torch.Tensor, need_x: bool, need_a: bool, need_b: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The gradients of :func:`_delta_forward` for ``x``, ``a`` and ``b`` (None where not
    needed)."""
    flat, h, a_c, b_c, keep = ctx.saved_tensors
    g = grad.reshape(-1, grad.shape[-1]).to(flat.dtype)
    g_h = torch.mm(g, b_c).mul_(ctx.scale)  # [tokens, r]
    grad_a = grad_b = grad_x = None
    if need_b:
        grad_b = torch.mm(g.t(), h).mul_(ctx.scale).to(ctx.param_dtypes[1])
    if need_a:
        grad_a = torch.mm(g_h.t(), flat).to(ctx.param_dtypes[0])
    if need_x:
        grad_x = torch.mm(g_h, a_c)
        if keep is not None:
            grad_x.mul_(ctx.drop_scale).mul_(ones_where_kept(keep, grad_x.dtype))
        grad_x = grad_x.view(ctx.x_shape)
    return grad_x, grad_a, grad_b


class _SharedCast:
    """The last input converted to the compute dtype. q, k and v (and gate and up) read the
    same tensor: over 4-bit layers it is converted once instead of once per layer. Holds the
    source weakly and checks its version, so an input changed in place is converted again."""

    def __init__(self) -> None:
        self._source: Any = None
        self._version = -1
        self._cast: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x.dtype == dtype:
            return x
        if x.is_inference():  # no version counter to check: not cached
            return x.to(dtype)
        cast = self._cast
        if (
            cast is not None
            and cast.dtype == dtype
            and self._source is not None
            and self._source() is x
            and self._version == x._version
        ):
            return cast
        cast = x.to(dtype)
        self._source, self._version, self._cast = weakref.ref(x), x._version, cast
        return cast


_shared_cast = _SharedCast()


def _is_bnb(module: Any, name: str) -> bool:
    """bitsandbytes' own layer class ``name`` (``Linear4bit``, ``Linear8bitLt``) or a subclass,
    not PEFT's LoRA layer of the same name."""
    return any(
        c.__name__ == name and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__
    )


def is_4bit_layer(module: Any) -> bool:
    """``module`` is a bitsandbytes 4-bit layer."""
    return _is_bnb(module, "Linear4bit")


def bf16_4bit_layer(layer: Any) -> bool:
    """``layer`` (or the base layer a PEFT adapter wraps) is a bitsandbytes 4-bit layer that
    computes in bf16."""
    base = getattr(layer, "base_layer", layer)
    return (
        _is_bnb(base, "Linear4bit")
        and base.compute_type_is_set
        and base.compute_dtype == torch.bfloat16
    )


def _fusable_4bit(base: Any, x: torch.Tensor) -> bool:
    """A bitsandbytes ``Linear4bit`` in training layout (not repacked for CPU inference), with
    its compute dtype set and no trained bias: what :class:`Lora4bit` and :class:`Base4bit`
    compute."""
    if not _is_bnb(base, "Linear4bit"):
        return False
    state = getattr(base.weight, "quant_state", None)
    return (
        x.device.type == "cpu"
        and state is not None
        and not getattr(state, "packing_format_for_cpu", False)
        and base.compute_type_is_set
        and base.compute_dtype is not None
        and (base.bias is None or not base.bias.requires_grad)
    )


class Lora4bit(torch.autograd.Function):
    """A 4-bit base layer and its LoRA delta as one node: ``base(x) + LoraDelta(x)``.

    bitsandbytes' ``Linear4bit`` converts its input to the compute dtype, multiplies by the
    dequantized weight and converts the output back to the input's dtype (fp32 in QLoRA: the
    residual stream, norms and LoRA stay fp32); its backward converts the gradient, dequantizes
    again and converts back; autograd then adds that to the LoRA branch's gradient. Here the
    input's conversion is shared by the layers that read it (:class:`_SharedCast`), and the
    base's bf16 output and input gradient are added to the fp32 LoRA terms in one mixed-dtype
    pass each instead of a conversion plus an add. The arithmetic is bitsandbytes' (same
    dequantization, same matmuls in the compute dtype) and :class:`LoraDelta`'s.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: Any,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float,
        drop: Any,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        base = _base_forward(ctx, x, weight, bias, compute_dtype)
        delta = _delta_forward(ctx, x, a, b, scale, drop)
        return delta.add_(base)  # one mixed-dtype pass; bnb: base.to(x.dtype) + delta

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        grad_x, grad_a, grad_b = _delta_backward(ctx, grad, need_x, need_a, need_b)
        if grad_x is not None:
            grad_x.add_(_base_input_grad(ctx, grad))
        return grad_x, None, None, grad_a, grad_b, None, None, None


class Base4bit(torch.autograd.Function):
    """A 4-bit layer without an adapter (in QLoRA usually the MLP's), as bitsandbytes'
    ``Linear4bit`` computes it in training, with the input's conversion shared
    (:class:`_SharedCast`) and the backward's weight dequantized straight to the compute dtype
    (bitsandbytes dequantizes to the weight's original dtype, often fp32, and converts: one
    more pass over the whole weight; the values are the same)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: Any, bias: Any, compute_dtype: torch.dtype
    ) -> Any:
        return _base_forward(ctx, x, weight, bias, compute_dtype).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        return _base_input_grad(ctx, grad).to(grad.dtype), None, None, None


def _base_forward(
    ctx: Any, x: torch.Tensor, weight: Any, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """bitsandbytes' ``Linear4bit`` forward in the compute dtype, the input's conversion shared;
    a (frozen) bias is added in the compute dtype, as bitsandbytes adds it."""
    import bitsandbytes as bnb

    state = weight.quant_state
    if bias is not None:
        bias = bias.to(dtype)
    ctx.weight, ctx.state, ctx.compute_dtype = weight, state, dtype
    return bnb.matmul_4bit(_shared_cast(x, dtype), weight, bias=bias, quant_state=state)


def _base_input_grad(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' input gradient of a 4-bit layer: the output's gradient in the compute
    dtype times the weight dequantized again (nothing of it is kept between forward and
    backward), in the compute dtype."""
    import bitsandbytes.functional as bnbf

    dtype = ctx.compute_dtype
    state = copy.copy(ctx.state)
    state.dtype = dtype  # dequantize into the compute dtype directly: the same values
    return torch.matmul(grad.to(dtype), bnbf.dequantize_4bit(ctx.weight, state))


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A PEFT LoRA layer's forward through :class:`LoraDelta` (or, over a bitsandbytes 4-bit
    layer, :class:`Lora4bit`), or PEFT's own where it differs."""
    name = _fusable_adapter(self, args, kwargs)
    if name is None:
        return self._lorakit_peft_forward(x, *args, **kwargs)
    drop = self.lora_dropout[name]
    lora = (
        self.lora_A[name].weight,
        self.lora_B[name].weight,
        self.scaling[name],
        drop if isinstance(drop, FastDropout) and drop.threshold and drop.training else None,
    )
    base = self.base_layer
    if _fusable_4bit(base, x):
        return Lora4bit.apply(x, base.weight, base.bias, *lora, base.compute_dtype)
    result = base(x)
    delta = LoraDelta.apply(x, *lora)
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


def _fused_4bit_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """A bitsandbytes 4-bit layer's forward through :class:`Base4bit` in training, its own in
    evaluation (where bitsandbytes may repack it for inference) or where it differs."""
    if not self.training or not _fusable_4bit(self, x):
        return self._lorakit_bnb_forward(x)
    return Base4bit.apply(x, self.weight, self.bias, self.compute_dtype)


@contextlib.contextmanager
def training_arithmetic_without_dropout(model: Any) -> Iterator[None]:
    """``model`` in eval mode (no dropout anywhere), except the layers whose arithmetic
    differs between training and evaluation, which keep their training forward: the function
    a training step computes, less its dropout (:class:`lorakit.preference.StepReference`).
    Those layers are the fused LoRA layers (in bf16 PEFT's eval forward computes the LoRA
    branch in fp32, the fused one in bf16) and bitsandbytes' 8-bit layers (on CPU, evaluation
    quantizes the activations to int8, training multiplies by the dequantized weight); their
    own flag only, so their dropout stays off."""
    was_training = model.training
    layers = [
        m
        for m in model.modules()
        if "_lorakit_peft_forward" in vars(m) or _is_bnb(m, "Linear8bitLt")
    ]
    model.eval()
    for layer in layers:
        layer.training = True  # the layer's own flag: its dropout and base stay in eval
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False
        model.train(was_training)


def use_fused_lora(model: Any) -> int:
    """Give every PEFT LoRA linear layer of ``model`` the fused training forward, and every
    bitsandbytes 4-bit layer :class:`Base4bit`'s; return how many LoRA layers. Parameters,
    their names and the saved adapter stay exactly PEFT's."""
    from peft.tuners.lora import LoraLayer

    fused = 0
    for module in model.modules():
        if _is_bnb(module, "Linear4bit"):
            if "_lorakit_bnb_forward" not in vars(module):
                bare: Any = module
                bare._lorakit_bnb_forward = bare.forward
                bare.forward = types.MethodType(_fused_4bit_forward, bare)
            continue
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
