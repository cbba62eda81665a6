"""Does bf16 compute cost the demo quality? The default recipe trained in fp32 and in bf16.

    .venv/bin/python benchmarks/bench_dtype_quality.py [--seeds 42,43,44] [--dtypes fp32,bf16]
        [--recipe recipes/smollm2_qlora.toml]

Runs ``lorakit run`` on the recipe (the `make demo` recipe by default) once per compute dtype
and seed (``quant.compute_dtype=<dtype>``, ``train.seed=<seed>``; the data split stays the same,
so every run is scored on the same val examples), each in its own process, one after the other,
dtypes interleaved. Prints and writes (benchmarks/results/bench_dtype_quality-<time>.md) a table
of the tuned model's val metrics per run, and per dtype their mean and spread (min-max), with
the wall time of each run. Needs the demo data: `python examples/demo_task/make_data.py`.

The quality numbers do not depend on how busy the machine is (a run is bit-reproducible); the
times do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from profile_step import DTYPE_KEY  # the recipe key of each quant backend's dtype

REPO = Path(__file__).resolve().parents[1]
METRICS = ("json_match", "json_field_accuracy", "json_valid", "eval_loss")


def quant_plugin(recipe: Path) -> str:
    import tomllib

    return str(tomllib.loads(recipe.read_text(encoding="utf-8"))["quant"]["plugin"])


def tuned_metrics(run: Path) -> dict[str, float]:
    report = json.loads((run / "eval_report.json").read_text())
    for row in report["results"]:
        if row.get("adapter") and row.get("split") == "val":
            return {k: row["metrics"][k] for k in METRICS if k in row["metrics"]}
    raise SystemExit(f"{run}: no tuned val result in eval_report.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--recipe", type=Path, default=REPO / "recipes" / "smollm2_qlora.toml")
    args = p.parse_args()
    recipe = args.recipe.resolve()
    key = f"quant.{DTYPE_KEY[quant_plugin(recipe)]}"
    out = Path(tempfile.mkdtemp(prefix="bench_dtype_quality-"))
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for dtype in args.dtypes.split(","):
            name = f"{dtype}-seed{seed}"
            cmd = [sys.executable, "-m", "lorakit.cli.main", "run", str(recipe)]
            cmd += [f"{key}={dtype}", f"train.seed={seed}", "eval.baseline=false"]
            cmd += [f"output.dir={out}", f"output.name={name}"]
            started = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            row = {"dtype": dtype, "seed": seed, "seconds": round(time.time() - started, 1)}
            row.update(tuned_metrics(out / name))
            rows.append(row)
            print(json.dumps(row), flush=True)

    lines = [
        f"bench_dtype_quality: {recipe.name}, tuned model on the val split, runs in {out}",
        "",
        "| dtype | seed | " + " | ".join(METRICS) + " | wall s |",
        "|---" * (len(METRICS) + 3) + "|",
    ]
    for r in rows:
        cells = [f"{r.get(m, float('nan')):.4f}" for m in METRICS]
        lines.append(
            f"| {r['dtype']} | {r['seed']} | " + " | ".join(cells) + f" | {r['seconds']} |"
        )
    lines += ["", "| dtype | runs | " + " | ".join(f"{m} mean (min-max)" for m in METRICS) + " |"]
    lines.append("|---" * (len(METRICS) + 2) + "|")
    for dtype in args.dtypes.split(","):
        group = [r for r in rows if r["dtype"] == dtype]
        cells = []
        for m in METRICS:
            vals = [r[m] for r in group if m in r]
            cells.append(f"{statistics.mean(vals):.4f} ({min(vals):.4f}-{max(vals):.4f})")
        lines.append(f"| {dtype} | {len(group)} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    results = REPO / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (results / f"bench_dtype_quality-{stamp}.md").write_text(text + "\n", encoding="utf-8")
    (results / f"bench_dtype_quality-{stamp}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
