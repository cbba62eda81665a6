"""Attention of one example on CPU in bf16 as a few batched matmuls, instead of the flash kernel.

PyTorch's CPU flash kernel (``scaled_dot_product_attention``) walks an example in blocks of
queries and keys with small matmuls. On a CPU with fast bf16 that costs far more than the
arithmetic: before this module a bf16 run attended in fp32 up to 384 tokens (where the kernel
is faster than in bf16), and attention was a quarter of SmolLM2-135M's step on 2 cores of an AMD
EPYC with AVX512-BF16. Here each example's attention is one autograd node of batched matmuls
over the whole example (or over blocks of its queries, below), the 16-bit ones in bf16
(``benchmarks/bench_attention.py`` times both paths):

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

An example of ``2 x BLOCK_QUERIES`` queries or more is attended in blocks of about
:data:`BLOCK_QUERIES` queries (:func:`query_blocks`), each against the keys up to the last one
its queries may see: under a causal mask the first block of two computes a quarter of the scores
instead of half, and the blocks together about ``(n + 1) / 2n`` of the whole matrix. The rows of
a block are independent in the forward; in the backward each block adds its share to the key and
value gradients (each share rounded to bf16 by its matmul, as CPU matmuls have no fp32 output
for bf16 inputs) in fp32, rounded to bf16 again at the end: dV about 15% further from fp64 than in
one block, dK 5% (rms), still closer than the kernel's. Each block costs a few dozen small
operations, so shorter examples stay whole, and its scores are temporaries of ``heads x 192 x
keys`` fp32 values, a few of them at a time (about 200 MB at 32 heads and 2048 keys, freed
with the call).

Below :data:`MIN_KEYS` those operations cost more than the arithmetic and the flash kernel takes
the example; above :data:`MAX_KEYS` too, since the row keeps each example's mask (6 bytes a
query and key), and above :data:`WHOLE_MAX_KEYS` when the example is too short for blocks.
fp32 runs keep the kernel, which is as fast there.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

# an example's attention runs here from MIN_KEYS to MAX_KEYS keys. Its speed against the flash
# kernel as lorakit called it before (fp32 up to 384 keys, bf16 above), forward and backward, 9
# heads of 64, 2 cores of an AMD EPYC with AVX512-BF16 (benchmarks/bench_attention.py): 0.76x at
# 64 keys (the dozens of small operations cost more than the arithmetic), 1.06-1.10x at 96,
# 1.35x at 128, 1.44x at 150, 1.8x at 300; in blocks of queries 1.8x at 400-640, 1.4x at 1536
# and 1.3-1.4x at 2048 and 3072 (whole, it fell to 0.99x at 1024, as the kernel skips the masked
# half of the scores). A 2048-key example's masks take 25 MB, once a row for all layers.
MIN_KEYS = 96
MAX_KEYS = 2048
# a call of fewer queries than two blocks (one block) takes at most this many keys: a short
# example after a long shared prefix (20 queries, 2048 keys) was measured less precise than the
# kernel there (its worst error 0.9-2.4x the kernel's over 8 seeds), and its speed was not
WHOLE_MAX_KEYS = 640
# queries a block (query_blocks): against one block, 0.95-1.03x at 300 queries in two blocks,
# 1.07-1.2x at 400-450, 1.2-1.3x at 640 in three, 1.5-1.6x at 1024-2048 (blocks of 128: 0.85-0.9x
# at 200 in two, no better at 640-2048; 256: no better)
BLOCK_QUERIES = 192


def applies(query: Any, key: Any, dropout: float) -> bool:
    """Whether :func:`attention` takes this call: bf16 on CPU, no attention dropout, and from
    :data:`MIN_KEYS` to :data:`WHOLE_MAX_KEYS` keys, or up to :data:`MAX_KEYS` for an example
    long enough to attend in blocks of queries. In fp32 PyTorch's flash kernel is as fast."""
    import torch

    keys = key.shape[-2]
    return (
        query.device.type == "cpu"
        and query.dtype == torch.bfloat16
        and dropout == 0.0
        and MIN_KEYS <= keys <= MAX_KEYS
        and (keys <= WHOLE_MAX_KEYS or block_count(query.shape[-2]) > 1)
    )


def attention(
    query: Any,
    key: Any,
    value: Any,
    allowed: Any,
    scale: float | None,
    bias: Masks | None = None,
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
    masks = bias if bias is not None else mask_bias(allowed, query.dtype)
    out = _Attention.apply(q, key.squeeze(0), value.squeeze(0), masks, float(scale))
    return out.view(1, heads, tq, dim)


class Masks(NamedTuple):
    """One mask as :func:`attention` uses it: additive biases (0 where a query may attend,
    ``-inf`` where not) in fp32 for the forward's fp32 scores and in the compute dtype for the
    backward's recomputed ones, and the blocks of queries it attends one at a time:
    ``(first query, end, keys)``, the block's queries seeing none of the keys from ``keys``
    on."""

    wide: Any
    low: Any
    blocks: tuple[tuple[int, int, int], ...]


def mask_bias(allowed: Any, dtype: Any) -> Masks:
    """:class:`Masks` of ``allowed`` for a run in ``dtype``."""
    import torch

    wide = torch.promote_types(dtype, torch.float32)
    bias = torch.zeros(allowed.shape, dtype=wide, device=allowed.device)
    bias.masked_fill_(~allowed, float("-inf"))
    return Masks(bias, bias.to(dtype), query_blocks(allowed))


def query_blocks(allowed: Any) -> tuple[tuple[int, int, int], ...]:
    """The queries of ``allowed`` cut into :func:`block_count` blocks of about equal size, each
    with the keys up to its queries' last allowed one. Under a causal mask (or one that opens
    with keys every query sees) a block of early queries needs only the early keys: the scores
    of the others are masked, and computing them is most of the cost of a long example."""
    import torch

    tq, tk = allowed.shape
    count = block_count(tq)
    if count == 1:
        return ((0, tq, tk),)
    # one past each query's last allowed key
    last = tk - allowed.flip(-1).to(torch.int32).argmax(-1)
    cuts = [round(i * tq / count) for i in range(count + 1)]
    return tuple((a, b, int(last[a:b].max())) for a, b in itertools.pairwise(cuts))


def block_count(tq: int) -> int:
    """How many blocks of queries an example's attention runs in: one per
    :data:`BLOCK_QUERIES` queries, since each block adds a few dozen small operations."""
    return max(1, tq // BLOCK_QUERIES)


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


def _exp_scores(q: Any, k1: Any, bias: Any, c: Any, scale: float) -> Any:
    """bf16 ``exp(scale * q k^T + bias - c)`` (``k1``: ``k`` with :func:`_with_ones`' columns),
    ``c`` one fp32 value per row (the backward's log-sum-exp, which makes it ``P``). ``-c /
    scale`` joins the matmul as a constant column, so each score is rounded once, after ``c``
    is taken off: close to 0 where the result is large, where bf16 is precise."""
    import torch

    s = torch.bmm(_with_constant(q, c.div(-scale)), k1.transpose(1, 2))
    view = s.view(s.shape[0], s.shape[1] // bias.shape[0], *bias.shape)
    torch.add(bias, view, alpha=scale, out=view)
    return s.exp_()


def _block(x: Any, heads: int, tq: int, a: int, b: int) -> Any:
    """Queries ``a`` to ``b`` of ``x`` (``[groups, heads * tq, n]``, a key/value group's heads one
    after the other) as ``[groups, heads * (b - a), n]``: a view of the whole, else a copy."""
    if a == 0 and b == tq:
        return x
    groups = x.shape[0]
    return x.view(groups, heads, tq, -1)[:, :, a:b].reshape(groups, heads * (b - a), -1)


def _make_function() -> Any:
    import torch

    class AttentionFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, v: Any, masks: Masks, scale: float) -> Any:
            groups, rows, _ = q.shape
            tq = masks.wide.shape[0]
            heads = rows // tq  # a key/value group's
            whole = len(masks.blocks) == 1
            out: Any = None if whole else q.new_empty(groups, heads, tq, v.shape[-1])
            lse: Any = None if whole else masks.wide.new_empty(groups, heads, tq, 1)
            for a, b, keys in masks.blocks:
                o, m = _block_forward(
                    _block(q, heads, tq, a, b),
                    k[:, :keys],
                    v[:, :keys],
                    masks.wide[a:b, :keys],
                    masks.low[a:b, :keys],
                    scale,
                )
                if whole:
                    out, lse = o, m
                else:
                    out[:, :, a:b] = o.view(groups, heads, b - a, -1)
                    lse[:, :, a:b] = m.view(groups, heads, b - a, 1)
            out, lse = out.view(groups, rows, -1), lse.view(groups, rows, 1)
            ctx.scale, ctx.masks = scale, masks
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            q, k, v, out, lse = ctx.saved_tensors
            masks, scale = ctx.masks, ctx.scale
            groups, rows, _ = q.shape
            tq = masks.wide.shape[0]
            heads = rows // tq
            grad = grad.contiguous()
            k1, v1 = _with_ones(k), _with_ones(v)
            if len(masks.blocks) == 1:
                return (
                    *_block_grads(q, k, v, k1, v1, grad, out, lse, masks.low, scale),
                    None,
                    None,
                )
            dq = q.new_empty(groups, heads, tq, q.shape[-1])
            # a key's gradient adds up over the blocks in fp32 (each block's share is rounded to
            # bf16 by its matmul), rounded again at the end
            dk = masks.wide.new_zeros(k.shape)
            dv = masks.wide.new_zeros(v.shape)
            for a, b, keys in masks.blocks:
                q_b, g_b, o_b, l_b = (_block(t, heads, tq, a, b) for t in (q, grad, out, lse))
                dq_b, dk_b, dv_b = _block_grads(
                    q_b,
                    k[:, :keys],
                    v[:, :keys],
                    k1[:, :keys],
                    v1[:, :keys],
                    g_b,
                    o_b,
                    l_b,
                    masks.low[a:b, :keys],
                    scale,
                )
                dq[:, :, a:b] = dq_b.view(groups, heads, b - a, -1)
                dk[:, :keys] += dk_b
                dv[:, :keys] += dv_b
            return dq.view(groups, rows, -1), dk.to(k.dtype), dv.to(v.dtype), None, None

    return AttentionFunction


def _block_forward(q: Any, k: Any, v: Any, wide: Any, low: Any, scale: float) -> tuple[Any, Any]:
    """The output of one block of queries against its keys, and each row's log-sum-exp (fp32).
    ``wide``, ``low``: the block's mask biases (:class:`Masks`)."""
    import torch

    s = _scores(q, k, wide, scale)
    p = torch.softmax(s, dim=-1)
    # the log-sum-exp from softmax's largest entry: max(p) = exp(max(s) - lse)
    lse = s.amax(-1, keepdim=True).sub_(p.amax(-1, keepdim=True).log_())
    return torch.bmm(p.to(q.dtype), v), lse


def _block_grads(
    q: Any, k: Any, v: Any, k1: Any, v1: Any, grad: Any, out: Any, lse: Any, bias: Any, scale: float
) -> tuple[Any, Any, Any]:
    """dQ, dK and dV of one block of queries against its keys (``k1``, ``v1``: ``k`` and ``v``
    with :func:`_with_ones`' columns)."""
    import torch

    delta = (grad.to(lse.dtype) * out.to(lse.dtype)).sum(-1, keepdim=True)
    p = _exp_scores(q, k1, bias, lse, scale)  # P again, from the log-sum-exp
    dv = torch.bmm(p.transpose(1, 2), grad)
    # dO V^T - delta rounded once, as above: -delta joins the matmul as a column
    dp = torch.bmm(_with_constant(grad, delta.neg_()), v1.transpose(1, 2))
    ds = dp.mul_(p)
    dq = torch.bmm(ds, k).mul_(scale)
    dk = torch.bmm(ds.transpose(1, 2), q).mul_(scale)
    return dq, dk, dv
