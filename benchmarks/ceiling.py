"""The speed ceiling of ``bench_train.py``: matmul FLOP/s over the FLOPs of a training token.

One LoRA training token costs about 4 x parameters FLOPs (forward, and backward to the inputs;
the frozen base needs no weight gradients). The ceiling is the fastest dtype's matmul FLOP/s
divided by that, measured two ways:

- square: one big square matmul (2048^2 on CPU, 8192^2 on a GPU), the best case of the chip;
- real shapes: the matmuls one training step really runs, [tokens x in] @ [in x out] for every
  linear layer (forward) and [tokens x out] @ [out x in] (backward to the inputs), with tokens
  the micro-batch's token count. Their rates are combined weighted by FLOPs per token
  (total FLOPs over total time), so a shape counts as much as it costs.

Small models have thin matrices (SmolLM2-135M: hidden 576) that run well below the square
rate, so the real-shape ceiling is the one a trainer can hope to approach.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

DTYPES = ("fp32", "bf16")


def linear_shapes(config: dict) -> list[tuple[int, int, int]]:
    """``(in, out, count)`` of the matmuls of one token's forward pass through a Llama-style
    model: q, k, v, o, gate, up, down in every layer, and the LM head once."""
    h = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    inter = config["intermediate_size"]
    layers = config["num_hidden_layers"]
    per_layer = [(h, heads * hd), (h, kv * hd), (h, kv * hd), (heads * hd, h)]
    per_layer += [(h, inter), (h, inter), (inter, h)]
    counts = Counter(per_layer)
    shapes = [(i, o, n * layers) for (i, o), n in counts.items()]
    return [*shapes, (h, config["vocab_size"], 1)]


def training_matmuls(shapes: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Each forward ``(in, out, count)`` and its backward-to-inputs ``(out, in, count)``, equal
    shapes merged (up's backward is down's forward)."""
    counts: Counter[tuple[int, int]] = Counter()
    for i, o, n in shapes:
        counts[(i, o)] += n
        counts[(o, i)] += n
    return [(i, o, n) for (i, o), n in counts.items()]


def combined_rate(matmuls: list[tuple[int, int, int]], rates: list[float]) -> float:
    """The FLOP/s of running all ``matmuls`` (``(in, out, count)``) once, each at its rate:
    total FLOPs over total time (the token count cancels)."""
    flops = [2 * i * o * n for i, o, n in matmuls]
    return sum(flops) / sum(f / r for f, r in zip(flops, rates, strict=True))


def _torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def matmul_rate(dtype: Any, m: int, k: int, n: int, seconds: float, device: str = "cpu") -> float:
    """Measured FLOP/s of [m x k] @ [k x n] in ``dtype`` (at least two calls after a warm-up)."""
    import torch

    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    calls, start = 0, time.perf_counter()
    while True:
        a @ b
        calls += 1
        sync()
        elapsed = time.perf_counter() - start
        if calls >= 2 and elapsed >= seconds:
            return 2 * m * k * n * calls / elapsed


def square_flops(device: str) -> dict[str, float]:
    """Best square-matmul FLOP/s of fp32 and bf16 (the lorakit.device timing on CPU)."""
    import torch

    if device == "cuda":
        return {d: matmul_rate(_torch_dtype(d), 8192, 8192, 8192, 1.0, "cuda") for d in DTYPES}
    from lorakit.device import matmul_flops

    fp32 = max(matmul_flops(torch.float32, size=n, seconds=1.0) for n in (1024, 2048))
    # without bf16 instructions a 1024^3 bf16 matmul takes seconds: measure a smaller one first
    bf16 = matmul_flops(torch.bfloat16, size=256, seconds=0.5)
    if bf16 > fp32 / 4:
        bf16 = max(matmul_flops(torch.bfloat16, size=n, seconds=1.0) for n in (1024, 2048))
    return {"fp32": fp32, "bf16": bf16}


def real_shape_flops(
    config: dict, tokens: int, device: str, skip: set[str] = frozenset(), seconds: float = 0.3
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Combined FLOP/s of one training step's matmuls per dtype (dtypes in ``skip`` are not
    timed: 0), and the per-shape rates."""
    matmuls = training_matmuls(linear_shapes(config))
    rows: list[dict[str, Any]] = [{"m": tokens, "k": i, "n": o, "count": c} for i, o, c in matmuls]
    combined = {}
    for name in DTYPES:
        if name in skip:
            combined[name] = 0.0
            continue
        dtype = _torch_dtype(name)
        for row in rows:
            row[name] = matmul_rate(dtype, tokens, row["k"], row["n"], seconds, device)
        combined[name] = combined_rate(matmuls, [row[name] for row in rows])
    return combined, rows
