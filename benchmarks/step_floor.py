"""How close a step can come to its matmul ceiling: the step against its narrow twin's.

    .venv/bin/python benchmarks/step_floor.py [--model-size 135m|1.7b] [--dtype bf16|fp32]
        [--quant none|bnb-4bit] [--steps 24] [--batch 4] [--data FILE]

bench_train's ceiling is the time the step's matmuls take at the rate the same shapes run alone
(``ceiling.py``: real shapes), and its share is that time over the step's. A CPU with AMX runs
bf16 matmuls about 2x faster than an AVX512-BF16 one and 4-10x faster than fp32, so on such a
CPU the rest of the step decides the share. Part of that rest does not depend on the model's
width at all: each operator's call and the autograd graph around it (about 22,000 calls a step
of 4 examples on the 135M model), attention's work per score (quadratic in an example's length,
per head), the head's softmax over the 49k-token vocabulary, the optimizer's per-tensor calls.

This script measures that part. It builds the embedded SmolLM2-135M-Instruct (or, with
``--model-size 1.7b``, the random-weight 1.7B shape) and its narrow twin (``model_sizes.py``:
``135m-narrow``, the same 30 layers, 9 heads over 3, vocabulary and operators at width 72;
``1.7b-narrow``, 24 layers of 32 heads at width 256) as ``profile_step.py`` builds a model.
For each batch it times a training step of each (forward, backward, clipping, AdamW) on the
same examples, and two sets of matmuls on random inputs in the step's dtype: those the step
runs (every linear layer's forward and backward to its input at the positions the step
computes, a shared prefix once; the head's at its supervised positions) and those of the
ceiling (``ceiling.py``'s real shapes: the same, at every token of every example, the head
included: 4 x parameters FLOPs a token). The four run in turns whose order alternates from
batch to batch: this VM's speed drifts by 10-25% within minutes, and the turns put the drift
on all four alike. It prints per token (of every example whole, as bench_train counts):

- step: the model's step;
- floor: the narrow twin's step, an upper bound on the part of the step that does not depend
  on the width (the twin's own matmuls are not free, though with heads of 8 they are mostly
  call overhead);
- the step's matmuls alone;
- the rest: step - floor - its matmuls, the width-dependent work beyond the matmuls' time
  alone (elementwise passes over the activations, dropout masks, LoRA's thin matmuls,
  attention's matmuls at head size 64, matmuls slower in the step than alone);
- the ceiling's matmuls;

then the share of the real-shapes ceiling (ceiling's matmuls / step, bench_train's share) and
what it would be if the rest cost nothing (ceiling's matmuls / (step's matmuls + floor)). On a
CPU with faster matmuls both matmul times divide by its speed-up and the floor stays: it is set
by the CPU's scalar speed and memory, not by its matrix unit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
TWINS = {"135m": "135m-narrow", "1.7b": "1.7b-narrow"}  # a model and its narrow twin
LABELS = {
    "step": "step",
    "floor": "floor (the narrow twin's step)",
    "own": "the step's matmuls alone",
    "rest": "the rest: step - floor - its matmuls",
    "ceiling": "the ceiling's matmuls",
}


def main() -> None:
    import profile_step

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    profile_step.add_arguments(p)
    p.set_defaults(steps=24)
    args = p.parse_args()
    if args.steps < 3:
        p.error("--steps: at least 3 (the first two batches are not timed)")
    size = args.model_size or "135m"
    if args.model_path or size not in TWINS:
        p.error(f"--model-size: one of {', '.join(TWINS)} (a model with a narrow twin)")

    import ceiling
    import model_sizes
    import torch
    from lorakit.attention import packed_attention

    wide_args = argparse.Namespace(**{**vars(args), "model_size": None if size == "135m" else size})
    narrow_args = argparse.Namespace(**{**vars(args), "model_size": TWINS[size]})
    runs = {"step": profile_step.setup(wide_args), "floor": profile_step.setup(narrow_args)}
    folder = wide_args.model_path or model_sizes.embedded_folder()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    shapes = ceiling.linear_shapes(config)  # every layer's linears, then the head
    matmuls = ceiling.training_matmuls(shapes)
    layers, head = ceiling.training_matmuls(shapes[:-1]), ceiling.training_matmuls(shapes[-1:])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    seconds = {name: 0.0 for name in (*runs, "ceiling", "own")}
    tokens = batches = 0
    wide = runs["step"]
    with packed_attention(wide.model, "cpu"), packed_attention(runs["floor"].model, "cpu"):
        for step in range(args.steps):
            chosen = [wide.rows[i] for i in wide.order[step * args.batch : (step + 1) * args.batch]]
            length = sum(len(r.input_ids) for r in chosen)
            row = wide.batch(chosen)  # positions computed, with the shared prefix once
            supervised = int((row["labels"] != -100).sum())
            own = [(layers, row["input_ids"].shape[-1]), (head, supervised)]
            timed = {
                **{name: partial(train_step, run, chosen) for name, run in runs.items()},
                "ceiling": partial(matmul_step, matmul_operands([(matmuls, length)], dtype)),
                "own": partial(matmul_step, matmul_operands(own, dtype)),
            }
            for name in timed if step % 2 == 0 else reversed(timed):
                started = time.perf_counter()
                timed[name]()
                if step >= 2:
                    seconds[name] += time.perf_counter() - started
            if step >= 2:
                tokens += length
                batches += 1

    flops = 4 * sum(i * o * c for i, o, c in shapes) * tokens
    rate = flops / seconds["ceiling"]
    ms = {name: 1e3 * value / tokens for name, value in seconds.items()}
    ms["rest"] = ms["step"] - ms["floor"] - ms["own"]
    print(
        f"{size}, {args.quant}, compute {args.dtype}, {wide.threads} threads, {batches} batches of "
        f"{args.batch} timed ({tokens} tokens), the two steps and the matmuls alternated;"
        f" real-shapes {args.dtype} matmuls {rate / 1e9:.0f} GFLOP/s"
    )
    print("| per token | ms | tokens/s |")
    print("|---|---|---|")
    for name, label in LABELS.items():
        value = ms[name]
        print(
            f"| {label} | {value:.3f} | {1e3 / value:.0f} |"
            if value > 0
            else f"| {label} | {value:.3f} | |"
        )
    print(
        f"share of the real-shapes ceiling: {ms['ceiling'] / ms['step']:.2f} now; "
        f"{ms['ceiling'] / (ms['own'] + ms['floor']):.2f} if the rest cost nothing"
    )


def train_step(run: argparse.Namespace, chosen: list) -> None:
    """One training step of ``profile_step.setup``'s model on the examples ``chosen``."""
    import torch
    from lorakit.loss import supervised_nll

    nll, n = supervised_nll(run.model, run.batch(chosen))
    (nll / max(n, 1)).backward()
    torch.nn.utils.clip_grad_norm_(run.params, 1.0)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)


def matmul_operands(
    groups: list[tuple[list[tuple[int, int, int]], int]], dtype: Any
) -> list[tuple[Any, Any, int]]:
    """Random inputs for each group's matmuls (``(in, out, count)``, ``ceiling.py``) at its
    token count, and how often each is called; each shape called once first, so its kernel is
    built, as ``ceiling.matmul_rate`` does before timing."""
    import torch

    out = []
    for matmuls, tokens in groups:
        for i, o, count in matmuls:
            x, w = torch.randn(tokens, i).to(dtype), torch.randn(i, o).to(dtype)
            torch.mm(x, w)
            out.append((x, w, count))
    return out


def matmul_step(operands: list[tuple[Any, Any, int]]) -> None:
    import torch

    for x, w, count in operands:
        for _ in range(count):
            torch.mm(x, w)


if __name__ == "__main__":
    main()
