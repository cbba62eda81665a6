"""Merged micro-batches on CPU (``train.merge_micro_batches``): `lorakit run` with the micro-batches
of each optimizer step merged into packed rows of up to 1024 tokens, against the same run with
them apart, on the same data, model and steps.

    PYTHONPATH=core:plugins .venv/bin/python benchmarks/bench_merge.py [--batches 1 2]
        [--accumulation 8] [--steps 6] [--warmup 1] [--reps 2] [--dtype auto|bf16|fp32]
        [--model-path DIR]

The recipe is bench_train's (SmolLM2-135M-Instruct embedded, LoRA r=16 on q/k/v/o, the real
chat data, the machine's ``auto`` compute dtype unless ``--dtype`` forces one) with ``per_device_train_batch_size`` from
``--batches`` and ``gradient_accumulation_steps``. Each run is its own process; the two
settings alternate, the first of each round swapped from round to round. Useful tokens/s over
the steps after ``--warmup`` (metrics.jsonl's clock and token count), peak RSS from wait4, the
final train loss (the two differ by float order and by LoRA dropout's masks, which are drawn
per micro-batch). Prints one line per run and the ratio merged / apart per batch size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import DEFAULT_DATA, lorakit_setting_run


def run(folder: Path, batch: int, accumulation: int, merge: bool, args: argparse.Namespace) -> dict:
    tag = f"b{batch}-{'merged' if merge else 'apart'}-{time.time_ns()}"
    overrides = [
        f"train.per_device_train_batch_size={batch}",
        f"train.gradient_accumulation_steps={accumulation}",
        f"train.merge_micro_batches={'true' if merge else 'false'}",
        f'quant.dtype="{args.dtype}"',
    ]
    said = "merged into packed rows" if merge else None
    return lorakit_setting_run(folder, tag, args.data, args, overrides, said)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--accumulation", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--model-path", type=Path)
    args = p.parse_args()
    if not 1 <= args.warmup < args.steps:
        p.error("--warmup must be at least 1 and below --steps")
    results: dict[tuple[int, bool], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for batch in args.batches:
                order = (True, False) if rep % 2 == 0 else (False, True)
                for merge in order:
                    r = run(Path(tmp), batch, args.accumulation, merge, args)
                    results.setdefault((batch, merge), []).append(r)
                    print(
                        f"batch {batch} x {args.accumulation}, {'merged' if merge else 'apart '}: "
                        f"{r['tps']:.1f} tokens/s, peak RSS {r['rss_gb']:.2f} GB, "
                        f"final loss {r['loss']:.4f}, {r['tokens']} tokens",
                        flush=True,
                    )
    for batch in args.batches:
        merged = statistics.median(r["tps"] for r in results[(batch, True)])
        apart = statistics.median(r["tps"] for r in results[(batch, False)])
        print(
            f"batch {batch} x {args.accumulation} accumulation: merged {merged:.1f} / apart "
            f"{apart:.1f} tokens/s = x{merged / apart:.2f} (medians of {args.reps} round(s), "
            f"{args.steps} steps, first {args.warmup} left out, dtype {args.dtype})"
        )


if __name__ == "__main__":
    main()
