"""`lorakit plan` against measured peaks: predicted vs peak RSS (CPU) / CUDA max allocated.

    .venv/bin/python benchmarks/bench_plan.py [--steps 1] [--only 0,2] [--data FILE.jsonl]

Each configuration trains the embedded SmolLM2-135M-Instruct for a few steps with `lorakit run`
in its own process (packing on, so every micro-batch holds batch x max_length tokens, as the
plan assumes); the measured peak is the largest ``peak_memory_gb`` in its metrics.jsonl (the
process's peak RSS on CPU: it includes Python, torch and the libraries, which the plan counts
as a constant that this script measures again). With ``LORAKIT_MALLOC=return`` the first step
sets the peak (the fixed mmap threshold keeps later steps from growing it), so one step is
enough for that column; the longer-example configurations pack as many tokens as the short ones (2 x 768 =
8 x 192) so that only the example length changes. ``benchmarks/memory_stages.py`` breaks one
configuration down stage by stage. Each configuration runs twice: with ``LORAKIT_MALLOC=return``
(freed tensor memory goes back to the OS, so peak RSS follows the live tensors the plan counts)
and with glibc's default allocator (lorakit's default: faster steps, but freed memory stays in
the heap, which the plan does not model). The prediction comes from the same code as
`lorakit plan` with the same overrides, before the run. Memory only: no timing, safe on a busy
machine. Prints a markdown table (docs/plan.md holds one) and writes it to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = """
[model]
plugin = "smollm2-135m-instruct"

[[data.sources]]
plugin = "chat_jsonl"
path = "{data}"

[data]
val_fraction = 0.02
test_fraction = 0.0

[quant]
plugin = "{quant}"

[peft]
r = 16
alpha = 32
dropout = 0.05
target_modules = "all-linear"

[train]
max_steps = {steps}
packing = true  # every micro-batch holds batch x max_length tokens, as the plan assumes
logging_steps = 1
save_steps = 1000
optim = "adamw_torch"

[eval]
metrics = ["eval_loss"]
baseline = false
max_examples = 4

[output]
dir = "{out}"
"""
# name -> (quant plugin, overrides)
CONFIGS = {
    "LoRA fp32, batch 8 x 192": (
        "none",
        ['quant.dtype="fp32"', "train.per_device_train_batch_size=8", "train.max_length=192"],
    ),
    "QLoRA NF4, batch 8 x 192": (
        "bnb-4bit",
        [
            'quant.compute_dtype="fp32"',
            "train.per_device_train_batch_size=8",
            "train.max_length=192",
        ],
    ),
    "QLoRA NF4, batch 2 x 768": (
        "bnb-4bit",
        [
            'quant.compute_dtype="fp32"',
            "train.per_device_train_batch_size=2",
            "train.max_length=768",
        ],
    ),
    "QLoRA NF4, batch 2 x 768, checkpointing": (
        "bnb-4bit",
        [
            'quant.compute_dtype="fp32"',
            "train.per_device_train_batch_size=2",
            "train.max_length=768",
            "train.gradient_checkpointing=true",
        ],
    ),
    # long examples in bf16: math_attention's blocks of queries and each example's masks, kept
    # once a row (run it with --data of long examples, e.g. 8-turn chats of ~950 tokens)
    "LoRA bf16, batch 1 x 2048": (
        "none",
        ['quant.dtype="bf16"', "train.per_device_train_batch_size=1", "train.max_length=2048"],
    ),
}
MODES = {"return": {"LORAKIT_MALLOC": "return"}, "glibc": {"LORAKIT_MALLOC": "glibc"}}
RUNTIME_PROBE = """
import resource
from lorakit.cli.main import _quiet_libraries
_quiet_libraries("run")
import torch, transformers, peft, bitsandbytes, lorakit.runner, lorakit.training
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""


def predict(recipe_path: Path, overrides: list[str]) -> dict:
    from lorakit.catalog import default_catalog
    from lorakit.components import build_components
    from lorakit.preflight import plan_recipe
    from lorakit.recipe import load_recipe

    catalog = default_catalog()
    recipe = load_recipe(recipe_path, overrides, catalog)
    plan, note = plan_recipe(recipe, build_components(recipe, catalog), "cpu")
    return {"peak": plan.peak / 2**30, "train": plan.train_peak / 2**30, "note": note}


def measure(
    recipe_path: Path, overrides: list[str], workdir: Path, name: str, env: dict[str, str]
) -> float:
    cmd = [sys.executable, "-m", "lorakit.cli.main", "run", str(recipe_path), *overrides]
    cmd += [f"output.name={name}"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if res.returncode != 0:
        raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
    peaks = [
        json.loads(line).get("peak_memory_gb", 0.0)
        for line in (workdir / name / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    return max(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated configuration numbers (0-4)")
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/alpaca_seed_chat.jsonl"))
    args = parser.parse_args()
    data = Path(args.data).resolve()
    runtime = float(
        subprocess.run(
            [sys.executable, "-c", RUNTIME_PROBE], capture_output=True, text=True, check=True
        ).stdout.split()[-1]
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        only = {int(n) for n in args.only.split(",") if n.strip()}
        for i, (label, (quant, overrides)) in enumerate(CONFIGS.items()):
            if only and i not in only:
                continue
            recipe = Path(tmp) / f"c{i}.toml"
            recipe.write_text(
                BASE.format(data=data, quant=quant, steps=args.steps, out=Path(tmp) / "runs"),
                encoding="utf-8",
            )
            want = predict(recipe, overrides)
            row = {"config": label, "predicted_gb": want["peak"], "note": want["note"]}
            for mode, env in MODES.items():
                got = measure(recipe, overrides, Path(tmp) / "runs", f"c{i}-{mode}", env)
                row[f"measured_{mode}_gb"] = got
                row[f"error_{mode}"] = (want["peak"] - got) / got
            rows.append(row)
            print(
                f"{label}: predicted {want['peak']:.3f} GB, measured "
                f"{row['measured_return_gb']:.3f} GB with LORAKIT_MALLOC=return "
                f"({row['error_return']:+.1%}), {row['measured_glibc_gb']:.3f} GB with glibc's "
                f"default ({row['error_glibc']:+.1%})",
                flush=True,
            )
    lines = [
        f"runtime baseline (Python + torch + libraries, peak RSS): {runtime:.3f} GB",
        "",
        "| configuration | predicted peak | measured, `LORAKIT_MALLOC=return` | error |"
        " measured, glibc default | error |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {r['config']} | {r['predicted_gb']:.2f} GB | {r['measured_return_gb']:.2f} GB"
            f" | {r['error_return']:+.1%} | {r['measured_glibc_gb']:.2f} GB"
            f" | {r['error_glibc']:+.1%} |"
            for r in rows
        ),
    ]
    print("\n".join(lines))
    out = REPO / "benchmarks" / "results" / f"bench_plan-{time.strftime('%Y%m%d-%H%M%S')}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(
        json.dumps({"runtime_gb": runtime, "rows": rows}, indent=2), encoding="utf-8"
    )


if __name__ == "__main__":
    main()
