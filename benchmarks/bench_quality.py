"""Quality of the quantized base: the same LoRA training on fp32, NF4, NF4 + double quant and FP4.

    .venv/bin/python benchmarks/bench_quality.py [--steps 40] [--data ../shared/data/alpaca_seed_chat.jsonl]

Each variant runs `lorakit run` with the same recipe (embedded SmolLM2-135M-Instruct, LoRA r=16 on
every linear layer, batch 4, lr 2e-4 cosine, seed 42, the same hash split of the data) and only
``[quant]`` changed; the table reports the held-out loss and perplexity of the base model and of
the trained adapter, both scored on the quantized base they were trained on (token-weighted over
the val split). The QLoRA paper's claim to check: NF4 within ~2% of 16/32-bit LoRA, and better
than FP4. Losses do not depend on the machine's speed, so this benchmark needs no quiet machine.
Writes the table to benchmarks/results/bench_quality-<time>.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_seed_chat.jsonl"

# every variant computes in fp32, so only the base weights' format differs
Q4 = ['quant.plugin="bnb-4bit"', 'quant.compute_dtype="fp32"']
VARIANTS = {
    "LoRA fp32 (no quantization)": ['quant.plugin="none"', 'quant.dtype="fp32"'],
    "QLoRA NF4 + double quant": [*Q4, 'quant.quant_type="nf4"'],
    "QLoRA NF4": [*Q4, 'quant.quant_type="nf4"', "quant.double_quant=false"],
    "QLoRA FP4": [*Q4, 'quant.quant_type="fp4"', "quant.double_quant=false"],
}

RECIPE = """
[model]
plugin = "smollm2-135m-instruct"
[[data.sources]]
plugin = "chat_jsonl"
path = "{data}"
[data]
val_fraction = 0.2
test_fraction = 0.0
[quant]
plugin = "none"
[peft]
plugin = "lora"
r = 16
alpha = 32
dropout = 0.05
target_modules = "all-linear"
[train]
max_steps = {steps}
per_device_train_batch_size = 4
learning_rate = 2e-4
lr_scheduler_type = "cosine"
warmup_ratio = 0.05
logging_steps = 5
save_steps = 100000
max_length = 2048
seed = 42
[eval]
metrics = ["eval_loss", "perplexity"]
splits = ["val"]
baseline = true
[output]
dir = "{out}"
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = p.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"no data at {args.data}; pass --data")
    lorakit = str(Path(sys.executable).parent / "lorakit")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_quality-") as tmp:
        recipe = Path(tmp) / "quality.toml"
        recipe.write_text(RECIPE.format(data=args.data, steps=args.steps, out=Path(tmp) / "runs"))
        for i, (label, overrides) in enumerate(VARIANTS.items()):
            started = time.time()
            cmd = [lorakit, "run", str(recipe), f"output.name=v{i}", *overrides]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
            report = json.loads((Path(tmp) / "runs" / f"v{i}" / "eval_report.json").read_text())
            val = {
                "tuned" if r["adapter"] else "base": r["metrics"]
                for r in report["results"]
                if r["split"] == "val"
            }
            row = {
                "variant": label,
                "base_loss": val["base"]["eval_loss"],
                "tuned_loss": val["tuned"]["eval_loss"],
                "base_ppl": val["base"]["perplexity"],
                "tuned_ppl": val["tuned"]["perplexity"],
                "seconds": round(time.time() - started, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    ref = rows[0]["tuned_loss"]
    lines = [
        f"bench_quality: {args.steps} steps, batch 4, LoRA r=16 all-linear, {args.data.name} "
        "(val split 20%), held-out loss on the val split",
        "",
        "| variant | base val loss | tuned val loss | tuned vs LoRA fp32 | base ppl | tuned ppl |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['base_loss']:.4f} | {r['tuned_loss']:.4f} | "
            f"{100 * (r['tuned_loss'] / ref - 1):+.2f}% | {r['base_ppl']:.3f} | {r['tuned_ppl']:.3f} |"
        )
    text = "\n".join(lines)
    print("\n" + text)
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_quality-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
