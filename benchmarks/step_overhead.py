"""What a training step costs before it does any work: the step's time against its row's length.

    .venv/bin/python benchmarks/step_overhead.py [--model-size 135m|1.7b] [--dtype bf16|fp32]
        [--lengths 16,32,64,128,256] [--reps 4] [--batch 4]

``step_floor.py`` splits a step into its matmuls, the width-dependent rest and a floor that
does not depend on the width. Part of that floor does not depend on the tokens either: every
operator call, autograd node and optimizer update is paid once per micro-batch, whatever its
length. This script measures that part: it trains the model and its narrow twin
(``model_sizes.py``) on micro-batches of ``--batch`` real examples cut to their last L tokens,
for each L of ``--lengths``, the two models and the lengths alternating in order from rep to
rep (this VM's speed drifts), and prints the best time of each per step and per token. The
per-micro-batch overhead is the step time extrapolated to no tokens from the two shortest
lengths (attention's cost, quadratic in L, is small there); on a CPU whose matmuls are fast
it is what a short micro-batch pays, so it says how long rows must be for the per-token cost
to approach the floor.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import profile_step
    import step_floor

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    profile_step.add_arguments(p)
    p.add_argument(
        "--lengths", default="16,32,64,128,256", help="tokens per example, comma-separated"
    )
    p.add_argument("--reps", type=int, default=4, help="timed steps per model and length")
    args = p.parse_args()
    lengths = sorted({int(x) for x in args.lengths.split(",") if x.strip()})
    if len(lengths) < 2 or lengths[0] < 2 or args.reps < 1:
        p.error("--lengths: two or more lengths of 2 tokens or more; --reps: 1 or more")
    size = args.model_size or "135m"
    if args.model_path or size not in step_floor.TWINS:
        p.error(f"--model-size: one of {', '.join(step_floor.TWINS)}")

    import attrs
    from lorakit.attention import packed_attention

    models = {
        "model": argparse.Namespace(
            **{**vars(args), "model_size": None if size == "135m" else size}
        ),
        "narrow twin": argparse.Namespace(**{**vars(args), "model_size": step_floor.TWINS[size]}),
    }
    runs = {name: profile_step.setup(a) for name, a in models.items()}
    first = runs["model"]
    examples = [first.rows[i] for i in first.order if len(first.rows[i].input_ids) >= lengths[-1]]
    examples = examples[: args.batch]
    if len(examples) < args.batch:
        p.error(f"the data has fewer than {args.batch} examples of {lengths[-1]} tokens or more")

    def cut(length: int) -> list:
        return [
            attrs.evolve(r, input_ids=r.input_ids[-length:], labels=r.labels[-length:])
            for r in examples
        ]

    best = {(name, n): float("inf") for name in runs for n in lengths}
    with (
        packed_attention(runs["model"].model, "cpu"),
        packed_attention(runs["narrow twin"].model, "cpu"),
    ):
        for rep in range(args.reps + 1):  # the first round builds kernels: not timed
            order = [(name, n) for n in lengths for name in runs]
            for name, n in order if rep % 2 == 0 else reversed(order):
                chosen = cut(n)
                started = time.perf_counter()
                step_floor.train_step(runs[name], chosen)
                if rep:
                    best[name, n] = min(best[name, n], time.perf_counter() - started)

    print(
        f"{size}, {args.quant}, compute {args.dtype}, {first.threads} threads, micro-batches of "
        f"{args.batch} examples cut to L tokens each, best of {args.reps} steps"
    )
    print("| L | model ms/step | model ms/token | narrow twin ms/step | narrow twin ms/token |")
    print("|---|---|---|---|---|")
    for n in lengths:
        tokens = args.batch * n
        wide, narrow = 1e3 * best["model", n], 1e3 * best["narrow twin", n]
        print(f"| {n} | {wide:.1f} | {wide / tokens:.3f} | {narrow:.1f} | {narrow / tokens:.3f} |")
    a, b = lengths[0], lengths[1]
    for name in runs:
        slope = (best[name, b] - best[name, a]) / (args.batch * (b - a))
        overhead = best[name, a] - slope * args.batch * a
        print(
            f"{name}: about {1e3 * overhead:.0f} ms a micro-batch before any token "
            f"(extrapolated from L = {a} and {b}), {1e3 * slope:.3f} ms a token after"
        )


if __name__ == "__main__":
    main()
