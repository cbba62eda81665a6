"""Attention of one example on CPU in bf16 as a few batched matmuls, instead of the flash kernel.

PyTorch's CPU flash kernel (``scaled_dot_product_attention``) walks an example in blocks of
queries and keys with small matmuls. On a CPU with fast bf16 that costs far more than the
arithmetic: before this module a bf16 run attended in fp32 up to 384 tokens (where the kernel
is faster than in bf16), and attention was a quarter of SmolLM2-135M's step on 2 cores of an AMD
EPYC with AVX512-BF16. Here each example's attention is one autograd node of whole-example
matmuls, the 16-bit ones in bf16 (``benchmarks/bench_attention.py`` times both paths):

- forward: scores ``S = scale * Q K^T`` in fp32 with ``-inf`` where the mask forbids, every head
  of a key/value group in one matmul (grouped-query attention needs no repeated keys); ``P =
  softmax(S)`` in fp32, rounded to bf16 once for ``O = P V``; the log-sum-exp of each row is
  kept (from softmax's largest entry: ``max P = exp(max S - lse)``);
- backward: ``P`` recomputed in bf16 from ``Q``, ``K`` and that log-sum-exp; ``dV = P^T dO``;
  ``dS = P * (dO V^T - rowsum(dO * O))``; ``dQ = scale * dS K``; ``dK = scale * dS^T Q``.
  Nothing quadratic in the length is kept from forward to backward, as with the flash kernel,
  so the memory of a step does not change.

A bf16 matmul accumulates in fp32 and rounds its output once. In the backward the two large
terms of ``S - lse`` and of ``dO V^T - rowsum(dO * O)`` cancel, so the per-row constant joins the
matmul as two extra columns (its bf16 part and its bf16 rest) against columns of ones: the
difference is formed in the fp32 accumulator and rounded once, close to 0 where ``P`` is large.
The result is as close to fp64 attention as PyTorch's bf16 flash kernel (fp32 scores and
softmax, ``P`` and ``dS`` rounded to bf16): 3-7e-3 of each tensor's largest entry, dQ a little
further and dK and dV a little closer than the kernel's (``tests/test_math_attention.py``). It
is less precise than the fp32 attention bf16 runs used before, by about 2x on dQ and dK.

It computes the masked half of every score matrix and a few dozen small operations per call,
so :func:`applies` keeps it to examples from :data:`MIN_KEYS` to :data:`MAX_KEYS` keys; shorter
and longer ones go to the flash kernel. fp32 runs keep the kernel, which is as fast there.
"""

from __future__ import annotations

from typing import Any

# an example's attention runs here from MIN_KEYS to MAX_KEYS keys. Its speed against the flash
# kernel as lorakit called it before (fp32 up to 384 keys, bf16 above), forward and backward, 9
# heads of 64, 2 cores of an AMD EPYC with AVX512-BF16 (benchmarks/bench_attention.py): 0.76x at
# 64 keys (the dozens of small operations cost more than the arithmetic), 1.06x at 96, 1.35x at
# 128, 1.44x at 150, 1.82x at 300, 1.4-1.6x at 512, 1.04x at 768, 0.99x at 1024 (the kernel skips
# the masked half of the scores)
MIN_KEYS = 96
MAX_KEYS = 640


def applies(query: Any, key: Any, dropout: float) -> bool:
    """Whether :func:`attention` takes this call: bf16 on CPU, no attention dropout, and from
    :data:`MIN_KEYS` to :data:`MAX_KEYS` keys. In fp32 PyTorch's flash kernel is as fast."""
    import torch

    return (
        query.device.type == "cpu"
        and query.dtype == torch.bfloat16
        and dropout == 0.0
        and MIN_KEYS <= key.shape[-2] <= MAX_KEYS
    )


def attention(
    query: Any,
    key: Any,
    value: Any,
    allowed: Any,
    scale: float | None,
    bias: tuple[Any, Any] | None = None,
) -> Any:
    """``query`` ``[1, heads, Tq, dim]``, ``key``/``value`` ``[1, kv_heads, Tk, dim]``, ``allowed``
    ``[Tq, Tk]`` (True: query i may attend to key j; every query at least one key). Returns
    ``[1, heads, Tq, dim]`` in the query's dtype. ``bias``: :func:`mask_bias` of ``allowed``
    if the caller keeps it (every layer of a packed row attends its examples with the same
    masks: :mod:`lorakit.attention` builds them once a row)."""
    _, heads, tq, dim = query.shape
    groups = key.shape[1]
    if scale is None:
        scale = dim**-0.5
    # squeeze, not [0]: the backward of a view is a view, an index's writes a zero tensor
    q = query.squeeze(0).reshape(groups, (heads // groups) * tq, dim)
    wide, low = bias if bias is not None else mask_bias(allowed, query.dtype)
    out = _Attention.apply(q, key.squeeze(0), value.squeeze(0), wide, low, float(scale))
    return out.view(1, heads, tq, dim)


def mask_bias(allowed: Any, dtype: Any) -> tuple[Any, Any]:
    """``allowed`` as additive biases (0 where a query may attend, ``-inf`` where not): fp32 for
    the forward's fp32 scores, and ``dtype`` for the backward's recomputed ones."""
    import torch

    wide = torch.promote_types(dtype, torch.float32)
    bias = torch.zeros(allowed.shape, dtype=wide, device=allowed.device)
    bias.masked_fill_(~allowed, float("-inf"))
    return bias, bias.to(dtype)


def _scores(q: Any, k: Any, bias: Any, scale: float) -> Any:
    """fp32 ``scale * q k^T + bias``: ``[groups, heads_per_group * Tq, Tk]``; ``bias`` ``[Tq, Tk]``
    is 0 where a query may attend and ``-inf`` where not."""
    import torch

    groups, n, _ = q.shape
    wide = torch.promote_types(q.dtype, torch.float32)
    s = torch.bmm(q.to(wide) * scale, k.to(wide).transpose(1, 2))
    s.view(groups, n // bias.shape[0], *bias.shape).add_(bias)
    return s


class _Attention:
    """The autograd function, built on first use (torch is imported lazily)."""

    _fn: Any = None

    @classmethod
    def apply(cls, *args: Any) -> Any:
        if cls._fn is None:
            cls._fn = _make_function()
        return cls._fn.apply(*args)


def _with_constant(x: Any, c: Any) -> Any:
    """``[x, high(c), rest(c)]`` along the last axis, in bf16: ``c`` (fp32, one per row) as a
    bf16 part and the bf16 rest, 16 of its bits. With :func:`_with_ones` on the other side, a
    matmul adds ``c`` to each row's products inside its fp32 accumulator."""
    import torch

    high = c.to(x.dtype)
    return torch.cat([x, high, (c - high.to(c.dtype)).to(x.dtype)], dim=-1)


def _with_ones(x: Any) -> Any:
    import torch

    return torch.cat([x, x.new_ones((*x.shape[:-1], 2))], dim=-1)


def _exp_scores(q: Any, k: Any, bias: Any, c: Any, scale: float) -> Any:
    """bf16 ``exp(scale * q k^T + bias - c)``, ``c`` one fp32 value per row (the backward's
    log-sum-exp, which makes it ``P``). ``-c / scale`` joins the matmul as a constant column,
    so each score is rounded once, after ``c`` is taken off: close to 0 where the result is
    large, where bf16 is precise."""
    import torch

    s = torch.bmm(_with_constant(q, c.div(-scale)), _with_ones(k).transpose(1, 2))
    view = s.view(s.shape[0], s.shape[1] // bias.shape[0], *bias.shape)
    torch.add(bias, view, alpha=scale, out=view)
    return s.exp_()


def _make_function() -> Any:
    import torch

    class AttentionFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, v: Any, wide: Any, bias: Any, scale: float) -> Any:
            s = _scores(q, k, wide, scale)
            p = torch.softmax(s, dim=-1)
            ctx.scale = scale
            # the log-sum-exp from softmax's largest entry: max(p) = exp(max(s) - lse)
            lse = s.amax(-1, keepdim=True).sub_(p.amax(-1, keepdim=True).log_())
            out = torch.bmm(p.to(q.dtype), v)
            ctx.save_for_backward(q, k, v, out, bias, lse)
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            q, k, v, out, bias, lse = ctx.saved_tensors
            grad = grad.contiguous()
            delta = (grad.to(lse.dtype) * out.to(lse.dtype)).sum(-1, keepdim=True)
            p = _exp_scores(q, k, bias, lse, ctx.scale)  # P again, from the log-sum-exp
            dv = torch.bmm(p.transpose(1, 2), grad)
            # dO V^T - delta rounded once, as above: -delta joins the matmul as a column
            dp = torch.bmm(_with_constant(grad, delta.neg_()), _with_ones(v).transpose(1, 2))
            ds = dp.mul_(p)
            dq = torch.bmm(ds, k).mul_(ctx.scale)
            dk = torch.bmm(ds.transpose(1, 2), q).mul_(ctx.scale)
            return dq, dk, dv, None, None, None

    return AttentionFunction
