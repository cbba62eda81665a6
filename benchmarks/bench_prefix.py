"""A row's common prefix computed once on CPU (``train.share_prefix``): `lorakit run` with it
against the same run with every example packed whole, on the same data, model and steps.

    PYTHONPATH=core:plugins .venv/bin/python benchmarks/bench_prefix.py [--data-kinds template system]
        [--batch 4] [--steps 8] [--warmup 2] [--reps 2] [--dtype auto|bf16|fp32] [--model-path DIR]

The recipe is bench_train's (SmolLM2-135M-Instruct embedded, LoRA r=16 on q/k/v/o, batch 4,
no accumulation, the machine's ``auto`` compute dtype unless ``--dtype`` forces one), over
two versions of the real chat data:

- ``template``: the records as they are: the chat template adds SmolLM2's default system
  prompt (24 tokens with the user turn's opening, of 148 an example on average);
- ``system``: every record with the same system message of about 150 tokens first (written to
  a temporary copy), the case of a team that fine-tunes with its assistant's fixed
  instructions.

Each run is its own process; the two settings alternate, the first of each round swapped from
round to round. Useful tokens/s (every example's tokens, a shared prefix counted in each
example, as the Trainer's count of tokens seen does) over the steps after ``--warmup``, peak
RSS from wait4, and the final train loss (the two differ by float order and by LoRA dropout,
whose masks on shared positions are drawn once instead of once per example). Prints one line
per run and the ratio shared / whole per data kind.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import DEFAULT_DATA, lorakit_setting_run

# a made-up support assistant's standing instructions (about 150 SmolLM2 tokens)
SYSTEM = (
    "You are the support assistant of Northwind Outfitters, an online shop for outdoor gear. "
    "Answer the customer's message directly and politely, in the language it was written in. "
    "Keep answers short: at most five sentences unless the customer asks for details or a list. "
    "Never invent order numbers, prices, delivery dates or stock levels; if the answer needs "
    "them, say what the customer should check on their order page. Returns are free within "
    "30 days for unused items with their tags; refunds reach the original payment method in "
    "5-7 business days. Do not give medical, legal or safety advice beyond the product manual: "
    "refer the customer to a professional instead. If the message is abusive, answer once, "
    "calmly, and offer a human agent. Sign off with 'Northwind Support'."
)


def data_for(kind: str, folder: Path, source: Path) -> Path:
    if kind == "template":
        return source
    out = folder / "chat-with-system.jsonl"
    with source.open() as f, out.open("w") as g:
        for line in f:
            if line.strip():
                record = json.loads(line)
                record["messages"] = [{"role": "system", "content": SYSTEM}, *record["messages"]]
                g.write(json.dumps(record) + "\n")
    return out


def run(folder: Path, data: Path, kind: str, share: bool, args: argparse.Namespace) -> dict:
    tag = f"{kind}-{'shared' if share else 'whole'}-{time.time_ns()}"
    overrides = [
        f"train.per_device_train_batch_size={args.batch}",
        f"train.share_prefix={'true' if share else 'false'}",
        f'quant.dtype="{args.dtype}"',
    ]
    said = "computed once (train.share_prefix)" if share else None
    return lorakit_setting_run(folder, tag, data, args, overrides, said)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-kinds", nargs="+", default=["template", "system"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--model-path", type=Path)
    args = p.parse_args()
    if not 1 <= args.warmup < args.steps:
        p.error("--warmup must be at least 1 and below --steps")
    if unknown := set(args.data_kinds) - {"template", "system"}:
        p.error(f"unknown data kind(s) {sorted(unknown)}: template, system")
    results: dict[tuple[str, bool], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for kind in args.data_kinds:
                data = data_for(kind, Path(tmp), args.data)
                order = (True, False) if rep % 2 == 0 else (False, True)
                for share in order:
                    r = run(Path(tmp), data, kind, share, args)
                    results.setdefault((kind, share), []).append(r)
                    print(
                        f"{kind}, {'shared' if share else 'whole '}: {r['tps']:.1f} tokens/s, "
                        f"peak RSS {r['rss_gb']:.2f} GB, final loss {r['loss']:.4f}, "
                        f"{r['tokens']} tokens",
                        flush=True,
                    )
    for kind in args.data_kinds:
        shared = statistics.median(r["tps"] for r in results[(kind, True)])
        whole = statistics.median(r["tps"] for r in results[(kind, False)])
        print(
            f"{kind}: shared {shared:.1f} / whole {whole:.1f} tokens/s = x{shared / whole:.2f} "
            f"(medians of {args.reps} round(s), batch {args.batch}, {args.steps} steps, first "
            f"{args.warmup} left out, dtype {args.dtype})"
        )


if __name__ == "__main__":
    main()
