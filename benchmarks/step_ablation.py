"""What each of lorakit's CPU step changes is worth, measured in one process.

    .venv/bin/python benchmarks/step_ablation.py [--dtype bf16|fp32] [--quant none|bnb-4bit]
        [--steps 30] [--switch row_masks --switch query_blocks --switch bf16_scores]
        [--model-path DIR | --model-size 1.7b] [--data ../shared/data/alpaca_seed_chat.jsonl]

This VM's speed drifts by 10-25% from minute to minute, so two separate runs (or two runs of
``profile_step.py`` alternated) cannot tell a 3% change from noise. Here one model, built as
``profile_step.py`` builds it, runs every batch once per variant, the variants in alternating
order from batch to batch: the drift falls on all of them alike. Variant ``all off`` has every
chosen switch off; then each switch is turned on in turn, cumulatively. Each variant runs
forward, backward and clipping; the optimizer does not step, so every variant sees the same
weights. Prints tokens/s per variant after the first two batches and each variant's speed
against ``all off``.

The switches. ``row_masks`` is lorakit's code as it is, and off is what came before it: the
attention masks of a packed row built once for all layers (``attention._RowMasks``); off, every
layer builds its own.

``query_blocks`` is lorakit's code as it is: ``math_attention`` attends an example of
2 x ``BLOCK_QUERIES`` queries or more in blocks of queries, each against only the keys it may
see, and takes examples up to 2048 keys; off, every example in one block, and examples above 640
keys to PyTorch's flash kernel, as before it.

``bf16_scores`` is a candidate, not in lorakit: on, ``math_attention``'s forward takes each
row's largest score from bf16 scores and then ``exp(S - m)`` with ``m`` taken off inside the
matmul's accumulator (:func:`bf16_scores_block`, for each block of queries), instead of fp32
scores and softmax. In
isolation its forward was 1.2-1.5x faster from 150 to 600 tokens; in the step on an AMD Zen 5
(AVX512-BF16) it measured +0.4% and -0.3% (LoRA), -1.9% and +0.4% (QLoRA), with an output
1.2-1.4x further from fp64, so it was not kept. Where fp32 matmuls cost ~10x bf16 ones (AMX)
it may pay: run this there.

On this VM the same variant's ratio moves by 2-3% from one run of 28 batches to the next, so
only a difference beyond that, seen in two runs, is a result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
SWITCHES = ("row_masks", "query_blocks", "bf16_scores")


def bf16_scores_block(q: Any, k: Any, v: Any, wide: Any, low: Any, scale: float) -> Any:
    """The candidate for ``math_attention._block_forward``: each row's largest score ``m`` from
    bf16-rounded scores, then ``E = exp(S - m)`` in bf16 with ``-m / scale`` joined to the
    matmul as a constant column (as the backward recomputes ``P``), ``O = (E V) / rowsum(E)``
    with the sum in fp32, and the log-sum-exp ``m + log rowsum(E)`` kept for the backward.
    It joins the columns of ones to ``k`` for each block (lorakit's backward does it once a
    call): a small handicap to the candidate."""
    import torch
    from lorakit.math_attention import _exp_scores, _with_ones

    rough = torch.bmm(q, k.transpose(1, 2))
    rough.view(rough.shape[0], rough.shape[1] // low.shape[0], *low.shape).add_(low)
    top = rough.to(wide.dtype).amax(-1, keepdim=True).mul_(scale)
    e = _exp_scores(q, _with_ones(k), low, top, scale)  # exp(S - m), as the backward's P
    z = e.sum(-1, keepdim=True, dtype=wide.dtype)
    return torch.bmm(e, v).mul_(z.reciprocal()), top.add_(z.log())


class _NoRowMasks:
    def get(self, row: Any, key: Any, build: Any) -> Any:
        return build()


def switcher() -> Any:
    """``apply(on)``: set each switch named in ``on`` on, every other off."""
    from lorakit import attention, math_attention

    block_queries, max_keys = math_attention.BLOCK_QUERIES, math_attention.MAX_KEYS
    # name: (owner, attribute, value when on, value when off)
    saved = {
        "bf16_scores": (
            math_attention,
            "_block_forward",
            bf16_scores_block,
            math_attention._block_forward,
        ),
    }

    def apply(on: set[str]) -> None:
        for name, (owner, attr, new, old) in saved.items():
            setattr(owner, attr, new if name in on else old)
        blocks = "query_blocks" in on
        math_attention.BLOCK_QUERIES = block_queries if blocks else 1 << 30
        math_attention.MAX_KEYS = max_keys if blocks else 640
        # a fresh cache each time: a row's masks hold its blocks of queries
        attention._ROW_MASKS = attention._RowMasks() if "row_masks" in on else _NoRowMasks()

    return apply


def main() -> None:
    import profile_step

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    profile_step.add_arguments(p)
    p.add_argument(
        "--switch",
        action="append",
        choices=SWITCHES,
        help="a change to measure, in the order they are turned on (default: all, as listed)",
    )
    p.set_defaults(steps=30)
    args = p.parse_args()
    if args.steps < 3:
        p.error("--steps: at least 3 (the first two batches are not timed)")
    switches = args.switch or list(SWITCHES)

    import torch
    from lorakit.attention import packed_attention
    from lorakit.loss import supervised_nll

    run = profile_step.setup(args)
    apply = switcher()
    variants = [("all off", set())] + [
        (f"+ {name}", set(switches[: i + 1])) for i, name in enumerate(switches)
    ]
    seconds = {name: 0.0 for name, _ in variants}
    tokens = 0
    with packed_attention(run.model, "cpu"):
        for step in range(args.steps):
            chosen = [run.rows[i] for i in run.order[step * args.batch : (step + 1) * args.batch]]
            batch = run.batch(chosen)
            for name, on in variants if step % 2 == 0 else variants[::-1]:
                apply(on)
                started = time.perf_counter()
                nll, n = supervised_nll(run.model, batch)
                (nll / max(n, 1)).backward()
                torch.nn.utils.clip_grad_norm_(run.params, 1.0)
                run.opt.zero_grad(set_to_none=True)
                if step >= 2:
                    seconds[name] += time.perf_counter() - started
            if step >= 2:
                tokens += sum(len(r.input_ids) for r in chosen)
    apply({"row_masks", "query_blocks"})  # lorakit as it is
    print(
        f"{args.quant}, compute {args.dtype}, {run.threads} threads, "
        f"{args.steps - 2} batches of {args.batch} timed ({tokens} tokens), variants alternated"
    )
    print("| variant | tokens/s | speed against all off |")
    print("|---|---|---|")
    for name, _ in variants:
        print(
            f"| {name} | {tokens / seconds[name]:.1f} | {seconds['all off'] / seconds[name]:.3f}x |"
        )


if __name__ == "__main__":
    main()
