"""One example's attention, forward and backward, on CPU: PyTorch's flash kernel as lorakit
called it before (bf16 runs attending in fp32 up to 384 tokens) against
``lorakit.math_attention`` (batched matmuls, the 16-bit ones in bf16), at several lengths.

    PYTHONPATH=core .venv/bin/python benchmarks/bench_attention.py [--lengths 32 64 150 300 512]
        [--heads 9] [--kv-heads 3] [--dim 64] [--dtype bf16|fp32] [--rounds 3]

Defaults are SmolLM2-135M's heads (9 of 64, 3 key/value heads). Each length times every
contender in turn, round after round (interleaved, so a slow stretch of the machine hits all),
on the threads lorakit would use here, with lorakit's allocator setting; prints the median ms
per call, the ratio flash / math, and each contender's largest error against fp64 attention
(output and the three gradients, relative to each one's largest magnitude) on inputs rounded to
the dtype, with logits of about the size trained models reach.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "core"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 150, 300, 512])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from lorakit import device, math_attention
    from lorakit.attention import FP32_ATTENTION_MAX

    device.configure_malloc()
    threads = device.configure_threads()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    h, kvh, d = args.heads, args.kv_heads, args.dim

    def flash(q, k, v):
        # lorakit's call before math_attention: bf16 examples up to FP32_ATTENTION_MAX in fp32
        if q.dtype == torch.bfloat16 and k.shape[2] <= FP32_ATTENTION_MAX:
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=h != kvh)
        return out.to(dtype)

    masks: dict = {}

    def causal(n, dt, blocks):
        """The causal mask's biases, built once per length and dtype (in training, once a row
        for all layers) outside the timed calls; ``blocks`` False: the example in one block."""
        key = (n, dt, blocks)
        if key not in masks:
            bias = math_attention.mask_bias(torch.ones(n, n, dtype=torch.bool).tril_(), dt)
            masks[key] = bias if blocks else bias._replace(blocks=((0, n, n),))
        return masks[key]

    def math(q, k, v):
        return math_attention.attention(q, k, v, None, None, bias=causal(q.shape[2], q.dtype, True))

    def whole(q, k, v):
        # math_attention before it cut long examples into blocks of queries: all in one
        bias = causal(q.shape[2], q.dtype, False)
        return math_attention.attention(q, k, v, None, None, bias=bias)

    contenders = {"flash": flash, "whole": whole, "math": math}

    def inputs(n, dt, seed=0, size=1.0):
        g = torch.Generator().manual_seed(seed)
        make = [(1, h, n, d), (1, kvh, n, d), (1, kvh, n, d), (1, h, n, d)]
        t = [torch.randn(s, generator=g) for s in make]
        t[0], t[1] = t[0] * size, t[1] * size
        return [x.to(dtype).to(dt) for x in t]

    def timed(fn, n, reps):
        q, k, v, g = (x.requires_grad_(i < 3) for i, x in enumerate(inputs(n, dtype)))
        for _ in range(2):
            fn(q, k, v).backward(g)
        start = time.perf_counter()
        for _ in range(reps):
            fn(q, k, v).backward(g)
        return (time.perf_counter() - start) / reps * 1e3

    def errors(fn, n, dt):
        q, k, v, g = inputs(n, dt, seed=1, size=2.0)
        qkv = [x.requires_grad_() for x in (q, k, v)]
        out = fn(*qkv)
        return [out.detach(), *torch.autograd.grad(out, qkv, g)]

    print(f"{args.dtype}, {threads} threads, heads {h} (kv {kvh}) x {d}")
    print(
        "length | blocks | flash ms | whole ms | math ms | flash / math | whole / math "
        "| error flash (o, dq, dk, dv) | error whole | error math"
    )
    for n in args.lengths:
        reps = max(3, 2000 // n)
        times: dict[str, list[float]] = {c: [] for c in contenders}
        for r in range(args.rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for c in order:
                times[c].append(timed(contenders[c], n, reps))
        ref = errors(
            lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=h != kvh
            ),
            n,
            torch.float64,
        )
        errs = {}
        for c, fn in contenders.items():
            got = errors(fn, n, dtype)
            errs[c] = ", ".join(
                f"{float((a.double() - b).abs().max() / b.abs().max()):.1e}"
                for a, b in zip(got, ref, strict=True)
            )
        f, w, m = (statistics.median(times[c]) for c in ("flash", "whole", "math"))
        blocks = math_attention.block_count(n)
        print(
            f"{n} | {blocks} | {f:.2f} | {w:.2f} | {m:.2f} | {f / m:.2f}x | {w / m:.2f}x "
            f"| {errs['flash']} | {errs['whole']} | {errs['math']}"
        )


if __name__ == "__main__":
    main()
