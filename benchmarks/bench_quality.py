"""What the 4-bit base costs, and which LoRA init or trick wins it back, on the demo task.

    .venv/bin/python benchmarks/bench_quality.py [--steps 8] [--seeds 42,43,44]
        [--variants all|NAME,NAME] [--table-from RESULTS.json]

Every variant trains the same recipe (the embedded SmolLM2-135M-Instruct on the demo task,
``examples/demo_task``: shopping requests -> a JSON filter; LoRA r=16 on every linear layer,
batch 8, lr 1e-3 cosine, the same hash split of the data) for the same steps on the same
examples, with one thread and fp32 compute, so that only the base's format and the adapter's
start or optimiser differ:

- ``lora-fp32``: LoRA on the unquantized base (the reference); ``fp32-pissa``,
  ``fp32-gaussian`` and ``fp32-olora``: the same with that init, to tell the init's own effect
  from what it wins back of the 4-bit gap (each NF4 init against the same init in fp32);
- ``nf4-*``: QLoRA on the NF4 + double quant base with each ``[peft].init`` (default, gaussian,
  pissa and olora, which on a 4-bit base take the principal part from the fp32 weights and
  quantize only the residual: QPiSSA/QOLoRA, loftq), LoRA+ (``lora_plus_ratio = 16``) and
  NEFTune (``neftune_noise_alpha = 5``).

Each variant runs once per seed (``train.seed``: adapter init, dropout, data order; the split
stays the same), seeds outermost so a stopped benchmark has every variant at the same seeds. The
table gives the tuned model's held-out val loss and the demo's ``json_match`` per variant, mean
and spread (min-max) over the seeds, and the loss relative to ``lora-fp32``; with it, the
quantization gap of the untuned base on the same val examples (``lorakit plan --quant-gap``).
Rows are appended to a JSON file as they finish (``--table-from`` tabulates a partial one).
Losses do not depend on the machine's load (a run is bit-reproducible); CPU seconds per run
are reported, wall time is not. Writes benchmarks/results/bench_quality-<time>.{md,json}.
Needs the demo data: ``python examples/demo_task/make_data.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "demo_task" / "data" / "requests.jsonl"
CLI = "import sys; from lorakit.cli.main import main; sys.exit(main())"

NF4 = 'plugin = "bnb-4bit"\nquant_type = "nf4"\ndouble_quant = true\ncompute_dtype = "fp32"'
FP32 = 'plugin = "none"\ndtype = "fp32"'
# name -> (label, [quant] table, overrides)
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "lora-fp32": ("LoRA, fp32 base", FP32, []),
    "fp32-pissa": ("LoRA, fp32 base, pissa", FP32, ['peft.init="pissa"']),
    "fp32-gaussian": ("LoRA, fp32 base, gaussian init", FP32, ['peft.init="gaussian"']),
    "fp32-olora": ("LoRA, fp32 base, olora", FP32, ['peft.init="olora"']),
    "nf4-default": ("QLoRA NF4, default init", NF4, []),
    "nf4-gaussian": ("QLoRA NF4, gaussian init", NF4, ['peft.init="gaussian"']),
    "nf4-pissa": ("QLoRA NF4, pissa (QPiSSA)", NF4, ['peft.init="pissa"']),
    "nf4-olora": ("QLoRA NF4, olora (QOLoRA)", NF4, ['peft.init="olora"']),
    "nf4-loftq": ("QLoRA NF4, loftq", NF4, ['peft.init="loftq"']),
    "nf4-loraplus": ("QLoRA NF4, LoRA+ ratio 16", NF4, ["peft.lora_plus_ratio=16"]),
    "nf4-neftune": ("QLoRA NF4, NEFTune alpha 5", NF4, ["train.neftune_noise_alpha=5"]),
}

RECIPE = """
[model]
plugin = "smollm2-135m-instruct"
[[data.sources]]
plugin = "chat_jsonl"
path = "{data}"
[data]
val_fraction = 0.12
test_fraction = 0.08
[quant]
{quant}
[peft]
plugin = "lora"
r = 16
alpha = 32
dropout = 0.05
target_modules = "all-linear"
[train]
max_steps = {steps}
per_device_train_batch_size = 8
learning_rate = 1e-3
lr_scheduler_type = "cosine"
warmup_ratio = 0.1
logging_steps = 2
eval_steps = 100000
save_steps = 100000
max_length = 192
seed = 42
threads = 1
[eval]
metrics = ["eval_loss", "json_match"]
splits = ["val"]
max_new_tokens = 40
batch_size = 16
baseline = false
canary = false
[output]
dir = "{out}"
"""


def lorakit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True)


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tuned(run: Path) -> dict[str, float]:
    report = json.loads((run / "eval_report.json").read_text())
    for row in report["results"]:
        if row.get("adapter") and row.get("split") == "val":
            return {k: row["metrics"][k] for k in ("eval_loss", "json_match")}
    raise SystemExit(f"{run}: no tuned val result in eval_report.json")


def quant_gap(folder: Path, steps: int) -> str:
    recipe = folder / "nf4.toml"
    recipe.write_text(RECIPE.format(data=DATA, quant=NF4, steps=steps, out=folder / "runs"))
    proc = lorakit("plan", str(recipe), "--quant-gap", "39")
    line = [x for x in proc.stdout.splitlines() if x.startswith("quantization gap")]
    return line[0] if line else f"(quant gap not measured: {proc.stderr.strip()[-300:]})"


def spread(values: list[float], digits: int) -> str:
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(rows: list[dict], steps: int, gap: str) -> str:
    names = [n for n in VARIANTS if any(r["variant"] == n for r in rows)]
    ref = [r["eval_loss"] for r in rows if r["variant"] == "lora-fp32"]
    ref_mean = statistics.mean(ref) if ref else None
    lines = [
        f"bench_quality: demo task, {steps} steps x batch 8, LoRA r=16 all-linear, fp32 compute, "
        "1 thread; tuned model on the val split (39 examples); mean (min-max) over seeds",
        "",
        "| variant | seeds | val loss | vs LoRA fp32 | json_match % | CPU s/run |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        group = [r for r in rows if r["variant"] == name]
        losses = [r["eval_loss"] for r in group]
        rel = f"{100 * (statistics.mean(losses) / ref_mean - 1):+.1f}%" if ref_mean else "n/a"
        lines.append(
            f"| {VARIANTS[name][0]} | {','.join(str(r['seed']) for r in group)} | "
            f"{spread(losses, 4)} | {rel} | {spread([100 * r['json_match'] for r in group], 1)} | "
            f"{statistics.mean(r['cpu_s'] for r in group):.0f} |"
        )
    lines += ["", f"untuned base: {gap}"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--variants", default="all", help=f"comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--table-from", type=Path, help="tabulate the rows of an earlier run's JSON")
    p.add_argument("--no-gap", action="store_true", help="skip the untuned quantization gap")
    args = p.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = REPO / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    if args.table_from:
        saved = json.loads(args.table_from.read_text())
        print(table(saved["rows"], saved["steps"], saved["gap"]))
        return
    if not DATA.is_file():
        raise SystemExit(f"no demo data at {DATA}: run python examples/demo_task/make_data.py")
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]}; choose from {', '.join(VARIANTS)}")
    out_json = results / f"bench_quality-{stamp}.json"
    folder = Path(tempfile.mkdtemp(prefix="bench_quality-"))
    gap = "(not measured: --no-gap)" if args.no_gap else quant_gap(folder, args.steps)
    print(gap, flush=True)
    rows: list[dict] = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in names:
            _, quant, overrides = VARIANTS[name]
            recipe = folder / f"{name}.toml"
            recipe.write_text(
                RECIPE.format(data=DATA, quant=quant, steps=args.steps, out=folder / "runs")
            )
            before = child_cpu_seconds()
            run_name = f"{name}-{seed}"
            proc = lorakit(
                "run", str(recipe), f"train.seed={seed}", f"output.name={run_name}", *overrides
            )
            if proc.returncode != 0:
                raise SystemExit(f"{run_name} failed:\n{proc.stderr[-3000:]}")
            row = {"variant": name, "seed": seed, "cpu_s": round(child_cpu_seconds() - before)}
            row.update(tuned(folder / "runs" / run_name))
            rows.append(row)
            print(json.dumps(row), flush=True)
            out_json.write_text(json.dumps({"steps": args.steps, "gap": gap, "rows": rows}))
    text = table(rows, args.steps, gap)
    print("\n" + text)
    (results / f"bench_quality-{stamp}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
