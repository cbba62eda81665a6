"""lorakit.math_attention: one example's attention as batched matmuls (bf16 runs on CPU)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")


def _inputs(dtype, heads, kv_heads, tq, tk, dim=64, size=2.0, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, tq, dim, generator=g) * size
    k = torch.randn(1, kv_heads, tk, dim, generator=g) * size
    v = torch.randn(1, kv_heads, tk, dim, generator=g)
    out_grad = torch.randn(1, heads, tq, dim, generator=g)
    return [t.to(dtype) for t in (q, k, v, out_grad)]


def _mask(kind, tq, tk):
    """True where a query may attend: causal, causal after a shared context, or a pair."""
    import torch
    from lorakit.attention import pair_mask

    if kind == "causal":
        return pair_mask(tq, tq, 0)
    if kind == "context":  # tk - tq keys every query sees, then causal (prefix sharing)
        seen = torch.ones((tq, tk - tq), dtype=torch.bool)
        return torch.cat([seen, pair_mask(tq, tq, 0)], dim=1)
    return pair_mask(tq, tq // 2, tq // 4)  # a preference pair: prompt + chosen, rejected


def _reference(q, k, v, allowed):
    """SDPA with an explicit mask, keys and values repeated for grouped heads."""
    import torch.nn.functional as F

    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def _run(fn, q, k, v, out_grad, allowed):
    import torch

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, allowed)
    return [out.detach(), *torch.autograd.grad(out, leaves, out_grad)]


def _attend(q, k, v, allowed):
    from lorakit.math_attention import attention

    return attention(q, k, v, allowed, None)


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("kind", ["causal", "context", "pair"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4)])
def test_the_arithmetic_is_attention_in_fp64(kind, heads, kv_heads, blocks, monkeypatch):
    """In fp64 every rounding the bf16 path relies on is exact, so this checks the formulas:
    masks, grouped heads, the log-sum-exp recovered from softmax, the backward's constant
    columns, and queries attended in blocks against only the keys each block may see (their
    key gradients added up over the blocks). Output and all three gradients equal SDPA's to
    fp64 precision."""
    import torch
    from lorakit import math_attention

    tq, tk = 40, 40 if kind != "context" else 52
    monkeypatch.setattr(math_attention, "BLOCK_QUERIES", tq // blocks)
    assert len(math_attention.query_blocks(_mask(kind, tq, tk))) == blocks
    q, k, v, out_grad = _inputs(torch.float64, heads, kv_heads, tq, tk, dim=16)
    allowed = _mask(kind, tq, tk)
    got = _run(_attend, q, k, v, out_grad, allowed)
    want = _run(_reference, q, k, v, out_grad, allowed)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max(), name


def _relative_errors(got, want):
    return [
        float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(got, want, strict=True)
    ]


@pytest.mark.parametrize("kind", ["causal", "context", "pair"])
@pytest.mark.parametrize(("tq", "context"), [(160, 24), (500, 40)], ids=["one_block", "blocks"])
def test_bf16_is_as_close_to_exact_attention_as_the_flash_kernel(kind, tq, context):
    """SmolLM2's heads, logits of the size trained models reach (inputs x2). The reference is
    fp64 attention of the same bf16 inputs; PyTorch's bf16 SDPA (flash kernel: fp32 scores and
    softmax, P and dS rounded to bf16) is the yardstick. bf16 keeps 8 bits (2^-9 = 2e-3
    relative per rounding) and a gradient here goes through three or four roundings (the
    recomputed P, dO V^T - delta, their product, the matmul's output), so each result stays
    within 1.5e-2 of its largest entry, and the worst of the four within 2x the kernel's worst
    (measured on an AMD Zen 5 at 160 queries: 0.93x, 1.22x and 1.20x for the three masks; dq
    ~2.7x the kernel's, dk and dv at or below it). Another CPU's kernels round in another
    order. At 500 queries the example attends in blocks of queries, each against the keys up
    to its last query's, its key and value gradients added up over the blocks: the same
    bound."""
    import torch
    from lorakit import math_attention

    tk = tq + context if kind == "context" else tq
    allowed = _mask(kind, tq, tk)
    assert (len(math_attention.query_blocks(allowed)) > 1) == (tq == 500)
    q, k, v, out_grad = _inputs(torch.bfloat16, 9, 3, tq, tk)
    want = _run(_reference, *(t.double() for t in (q, k, v, out_grad)), allowed)
    ours = _relative_errors(_run(_attend, q, k, v, out_grad, allowed), want)
    flash = _relative_errors(_run(_reference, q, k, v, out_grad, allowed), want)
    assert max(ours) < 1.5e-2 and max(ours) <= 2 * max(flash), (ours, flash)


@pytest.mark.parametrize("kind", ["causal", "context", "pair"])
def test_query_blocks_cover_the_queries_and_every_key_they_may_see(kind):
    import torch
    from lorakit.math_attention import BLOCK_QUERIES, query_blocks

    for tq in (BLOCK_QUERIES - 1, BLOCK_QUERIES, 2 * BLOCK_QUERIES + 7, 5 * BLOCK_QUERIES):
        tk = tq + (24 if kind == "context" else 0)
        allowed = _mask(kind, tq, tk)
        blocks = query_blocks(allowed)
        assert len(blocks) == max(1, tq // BLOCK_QUERIES)
        assert [b[0] for b in blocks] == [0] + [b[1] for b in blocks[:-1]]
        assert blocks[-1][1] == tq and blocks[-1][2] == tk
        for a, b, keys in blocks:
            assert not allowed[a:b, keys:].any() and allowed[a:b, keys - 1].any()
        if len(blocks) > 1:  # what the blocks save: the first block's later keys
            assert blocks[0][2] < tk
    # an unusual mask (a late query that sees only the first key) still gets every key it sees
    allowed = torch.ones(2 * BLOCK_QUERIES, 2 * BLOCK_QUERIES, dtype=torch.bool).tril_()
    allowed[0, :] = True
    assert query_blocks(allowed)[0][2] == 2 * BLOCK_QUERIES


@pytest.mark.parametrize("tq", [120, 500])
def test_bf16_results_are_the_same_bits_every_time(tq):
    import torch

    q, k, v, out_grad = _inputs(torch.bfloat16, 9, 3, tq, tq)
    allowed = _mask("causal", tq, tq)
    first = _run(_attend, q, k, v, out_grad, allowed)
    second = _run(_attend, q, k, v, out_grad, allowed)
    assert all(a.equal(b) for a, b in zip(first, second, strict=True))


def test_it_takes_bf16_cpu_calls_of_its_lengths_only():
    import torch
    from lorakit.math_attention import (
        BLOCK_QUERIES,
        MAX_KEYS,
        MIN_KEYS,
        WHOLE_MAX_KEYS,
        applies,
    )

    def call(dtype, keys, dropout=0.0, queries=None):
        q = torch.zeros(1, 2, keys if queries is None else queries, 8, dtype=dtype)
        return applies(q, torch.zeros(1, 2, keys, 8, dtype=dtype), dropout)

    # a short example after a long shared prefix: in blocks only from two blocks of queries
    assert call(torch.bfloat16, WHOLE_MAX_KEYS, queries=20)
    assert not call(torch.bfloat16, WHOLE_MAX_KEYS + 1, queries=2 * BLOCK_QUERIES - 1)
    assert call(torch.bfloat16, MAX_KEYS, queries=2 * BLOCK_QUERIES)

    assert call(torch.bfloat16, MIN_KEYS) and call(torch.bfloat16, MAX_KEYS)
    assert not call(torch.bfloat16, MIN_KEYS - 1)  # short: the kernel's fewer calls win
    assert not call(torch.bfloat16, MAX_KEYS + 1)  # longer: the masks would take memory
    assert not call(torch.float32, MIN_KEYS)  # fp32: the kernel is as fast
    assert not call(torch.bfloat16, MIN_KEYS, dropout=0.1)  # no attention dropout here


def test_packed_rows_in_bf16_attend_through_it_as_each_example_alone(monkeypatch):
    """lorakit_varlen on a bf16 row of examples shorter than, within and longer than the
    lengths this path takes: each piece goes where it belongs, and the row's output and
    gradients match each example alone in fp64 to bf16 precision."""
    import itertools

    import torch
    from lorakit import math_attention
    from lorakit.attention import varlen_sdpa

    calls = []
    real = math_attention.attention
    monkeypatch.setattr(
        math_attention,
        "attention",
        lambda q, *a, **kw: calls.append(q.shape[2]) or real(q, *a, **kw),
    )
    monkeypatch.setattr(math_attention, "MAX_KEYS", 150)
    bounds = [0, 40, 160, 360, 460]

    class Module(torch.nn.Module):
        pass

    total = bounds[-1]
    q, k, v, out_grad = _inputs(torch.bfloat16, 9, 3, total, total, size=1.0)
    cu = torch.tensor(bounds, dtype=torch.int32)

    def row(q, k, v, _):
        return varlen_sdpa(Module().eval(), q, k, v, None, cu_seq_lens_q=cu)[0].transpose(1, 2)

    def alone(q, k, v, _):
        pieces = [
            _reference(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], _mask("causal", b - a, b - a))
            for a, b in itertools.pairwise(bounds)
        ]
        return torch.cat(pieces, dim=2)

    got = _run(row, q, k, v, out_grad, None)
    assert calls == [120, 100]  # 40 is too short, 200 too long for this path
    want = _run(alone, *(t.double() for t in (q, k, v, out_grad)), None)
    for name, error in zip(("out", "dq", "dk", "dv"), _relative_errors(got, want), strict=True):
        assert error < 1.5e-2, name


def test_a_rows_masks_are_kept_for_that_row_only():
    """attention._RowMasks: one build per key while the same row (the same boundaries tensor)
    comes back, a fresh start for another row, and nothing kept once the row is gone."""
    import gc
    import weakref

    import torch
    from lorakit.attention import _RowMasks

    masks, built = _RowMasks(), []

    def build():
        built.append(1)
        return torch.zeros(4, 4)

    row = torch.tensor([0, 4])
    first = masks.get(row, ("a",), build)
    assert masks.get(row, ("a",), build) is first and len(built) == 1
    masks.get(row, ("b",), build)
    assert len(built) == 2
    other = torch.tensor([0, 4])  # equal values, another row
    assert masks.get(other, ("a",), build) is not first and len(built) == 3
    kept = weakref.ref(masks.get(other, ("a",), build))
    del other
    gc.collect()
    assert kept() is None, "the masks go with their row"
    assert masks.get(None, ("a",), build) is not None and len(built) == 4  # no row: not kept
