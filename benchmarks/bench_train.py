"""Training speed: lorakit against TRL, a pad-to-512 Trainer script and a hand-written loop.

    .venv/bin/python benchmarks/bench_train.py [--steps 8] [--warmup 2] [--reps 2]
        [--data ../shared/data/alpaca_seed_chat.jsonl] [--only lorakit_lora,trl]
        [--model-size 135m,360m,1.7b | --model-path DIR]

Every contender trains the same model with LoRA r=16 (alpha 32, dropout 0.05) on q/k/v/o,
micro-batch 4, AdamW lr 2e-4 (linear), seed 42, on the same tokenized rows: lorakit's
chat-template rendering with completion-only labels (so "same data" means the same tokens and
the same supervised positions for all of them). The model (``model_sizes.py``):

    --model-size 135m   the embedded SmolLM2-135M-Instruct (the default)
    --model-size 360m   random weights with SmolLM2-360M's shapes (hidden 960, 32 layers)
    --model-size 1.7b   random weights with SmolLM2-1.7B's shapes (hidden 2048, 24 layers)
    --model-size 7b     random weights with Mistral-7B's layers (hidden 4096, 32 layers; a
                        14 GB folder, minutes a step on 2 cores: for loading and memory checks)
    --model-size 135m-narrow  SmolLM2-135M's layers, heads and vocabulary at width 72: what
                        a 135M step costs apart from its width (its ceiling columns mean little)
    --model-path DIR    a local model folder instead (save_pretrained, safetensors)

A step's speed does not depend on the weight values, so 360m and 1.7b are built once from a
config (no network) into $LORAKIT_CACHE/bench-models, else benchmarks/.models, with the
embedded model's tokenizer. Several sizes (``--model-size 135m,360m``) run one after the other,
each with its own table and results files. Contenders:

    lorakit_lora     `lorakit run` (packed rows, supervised-only head), compute dtype auto
                     (the fastest this machine has: bf16 on CPUs with AMX/AVX512-BF16 that
                     measure faster, fp32 on other CPUs, bf16 on recent GPUs)
    lorakit_qlora    `lorakit run` with the base in 4-bit NF4 (+ double quant)
    lorakit_return   `lorakit run` with LORAKIT_MALLOC=return: freed tensor memory goes back to
                     the OS at once (lower peak RSS on CPU); what that costs in step time
    trl              TRL SFTTrainer, gradient checkpointing off (rows padded per batch); bf16 off
                     on CPU (fp32), on a GPU the base in bf16 with bf16=True (what TRL's docs use)
    trl_bf16         what a TRL user gets by default: the model handed to SFTTrainer as a path
                     (TRL loads it in fp32) with a LoraConfig, and bf16=True (SFTConfig's
                     default), which on CPU as on a GPU is accelerate's bf16 autocast around the
                     forward pass; otherwise as trl (gradient checkpointing off, same rows)
    trl_packing      as trl with TRL's packing (BFD, padding-free), 1 row of 1024 tokens a step
    pad512           transformers Trainer, every row padded (or cut) to 512: what most
                     hand-written fine-tuning scripts do
    hand_loop        a plain PyTorch + PEFT loop, rows padded to the batch maximum

The table says what each contender computes in, as seen in its own process: lorakit's compute
dtype from the start line of `lorakit run` (``compute torch.bfloat16``), the others' base
weight dtype and the trainer's autocast (``bf16 base``, ``fp32``, ``fp32 + bf16 autocast``,
``nf4/bf16``). LoRA weights stay fp32 in every contender.

Each contender runs in its own process, one after the other (never two at once: on 2 cores two
trainers slow each other ~8x), interleaved round-robin for ``--reps`` rounds. A contender's speed
is useful (non-padding) tokens per second over the steps after ``--warmup``; peak memory is the
contender process's own peak RSS on CPU, CUDA max allocated on a GPU.

Two ceilings (``ceiling.py``), each the fastest dtype's matmul FLOP/s divided by the FLOPs of
one LoRA training token (4 x the model's parameters: forward, and backward to the inputs), with
the FLOP/s of fp32 and bf16 measured in the same run (on the GPU when there is one):

    square        one large square matmul (2048^2 on CPU), the chip's best case
    real shapes   the model's own matmuls at a micro-batch's token count (4 x the mean row
                  length): every linear layer forward and backward to the inputs, and the LM
                  head, combined weighted by their FLOPs per token

Each has its share-of-ceiling column; the header says which dtype is fastest for each.

Prints a table per model and writes it, with the raw numbers, to
benchmarks/results/bench_train-<size>-<time>.md and .json (<size>: the --model-path folder's
name for a local model). Run it on a quiet machine; a cheap check that the script works:
``--steps 2 --warmup 1 --reps 1 --only trl_bf16 --model-size 135m``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ceiling
import model_sizes
from train_workers import (
    ALPHA,
    BATCH,
    DROPOUT,
    LR,
    MAX_LENGTH,
    RANK,
    SEED,
    TARGETS,
    dtype_label,
    load_rows,
    short_dtype,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORKERS = Path(__file__).resolve().with_name("train_workers.py")
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_seed_chat.jsonl"
CONTENDERS = (
    "lorakit_lora",
    "lorakit_qlora",
    "lorakit_return",
    "trl",
    "trl_bf16",
    "trl_packing",
    "pad512",
    "hand_loop",
)

RECIPE = """
[model]
{model}
[[data.sources]]
plugin = "chat_jsonl"
path = "{data}"
[data]
val_fraction = 0.0
test_fraction = 0.0
[quant]
plugin = "{quant}"
[peft]
plugin = "lora"
r = {rank}
alpha = {alpha}
dropout = {dropout}
target_modules = {targets}
[train]
max_steps = {steps}
per_device_train_batch_size = {batch}
learning_rate = {lr}
lr_scheduler_type = "linear"
logging_steps = 1
save_steps = 100000
max_length = {max_length}
seed = {seed}
[eval]
metrics = []
baseline = false
[output]
dir = "{out}"
name = "{name}"
"""


def write_recipe(
    folder: Path, name: str, data: Path, quant: str, steps: int, model_path: Path | None
) -> Path:
    """A recipe for ``name``; ``model_path`` None: the embedded model."""
    path = folder / f"{name}.toml"
    model = (
        f'plugin = "local"\npath = "{model_path}"'
        if model_path
        else 'plugin = "smollm2-135m-instruct"'
    )
    path.write_text(
        RECIPE.format(
            model=model,
            data=data,
            quant=quant,
            rank=RANK,
            alpha=ALPHA,
            dropout=DROPOUT,
            targets=json.dumps(TARGETS),
            steps=steps,
            batch=BATCH,
            lr=LR,
            max_length=MAX_LENGTH,
            seed=SEED,
            out=folder / "runs",
            name=name,
        ),
        encoding="utf-8",
    )
    return path


def lorakit_compute(log: str) -> str:
    """The compute dtype from `lorakit run`'s start line (``... compute torch.bfloat16 ...``)."""
    import re

    found = re.search(r"\bcompute (torch\.\w+)", log)
    return short_dtype(found.group(1)) if found else "unknown"


def lorakit_records(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out.append(
                {
                    "step": r["step"],
                    "time": r["time"],
                    "tokens": r["num_input_tokens_seen"],
                    "loss": r["loss"],
                    "peak_memory_gb": r.get("peak_memory_gb"),
                }
            )
    return out


# ---------------------------------------------------------------------------------------------
# Parent


def run_contender(
    name: str, folder: Path, data: Path, steps: int, model_path: Path | None
) -> dict[str, Any]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if name == "lorakit_return":
        env["LORAKIT_MALLOC"] = "return"
    quant = "bnb-4bit" if name == "lorakit_qlora" else "none"
    tag = f"{name}-{time.time_ns()}"
    recipe = write_recipe(folder, tag, data, quant, steps, model_path)
    if name.startswith("lorakit"):
        cmd = [sys.executable, "-m", "lorakit.cli.main", "run", str(recipe)]
    else:
        cmd = [sys.executable, str(WORKERS), name, str(recipe), str(steps)]
    started = time.time()
    log_out, log_err = folder / f"{tag}.out", folder / f"{tag}.err"
    with log_out.open("w") as o, log_err.open("w") as e:
        proc = subprocess.Popen(cmd, env=env, stdout=o, stderr=e)
        # wait4 reaps exactly this child and gives its own peak RSS (KiB on Linux)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{log_err.read_text()[-3000:]}")
    if name.startswith("lorakit"):
        records = lorakit_records(folder / "runs" / tag)
        compute = lorakit_compute(log_err.read_text(errors="replace"))
        dtype = dtype_label(compute, quant="nf4" if quant == "bnb-4bit" else "")
    else:
        out = json.loads(log_out.read_text().strip().splitlines()[-1])
        records, dtype = out["records"], out["dtype"]
    # on a GPU the process reports CUDA max allocated; on CPU its own peak RSS (wait4) is exact
    rss = round(usage.ru_maxrss / 1024 / 1024, 2)
    if torch_cuda_available():
        rss = round(records[-1]["peak_memory_gb"], 2)
    return {
        "name": name,
        "started": started,
        "records": records,
        "dtype": dtype,
        "peak_rss_gb": rss,
    }


def lorakit_setting_run(
    folder: Path,
    tag: str,
    data: Path,
    args: argparse.Namespace,
    overrides: list[str],
    must_say: str | None,
) -> dict[str, Any]:
    """One `lorakit run` of this benchmark's recipe with ``overrides`` (``args``: ``steps``,
    ``warmup``, ``model_path``), for the benchmarks that compare one setting on and off;
    ``must_say``: text its log must hold (the setting took effect). Useful tokens/s after
    ``args.warmup`` steps, peak RSS (wait4), final loss and tokens."""
    recipe = write_recipe(folder, tag, data, "none", args.steps, args.model_path)
    cmd = [sys.executable, "-m", "lorakit.cli.main", "run", str(recipe), *overrides]
    err = folder / f"{tag}.err"
    with err.open("w") as e:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=e)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{tag} failed:\n{err.read_text()[-3000:]}")
    log = err.read_text(errors="replace")
    if must_say is not None and must_say not in log:
        raise SystemExit(f"{tag}: {must_say!r} is not in its log (not a CPU run?)\n{log[-2000:]}")
    records = lorakit_records(folder / "runs" / tag)
    return {
        "tps": throughput(records, args.warmup),
        "rss_gb": usage.ru_maxrss / 1024 / 1024,
        "loss": records[-1]["loss"],
        "tokens": records[-1]["tokens"],
    }


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def throughput(records: list[dict[str, Any]], warmup: int) -> float:
    first = next(r for r in records if r["step"] == warmup)
    last = records[-1]
    return (last["tokens"] - first["tokens"]) / (last["time"] - first["time"])


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    from lorakit.device import _cpu_model, usable_cores

    return f"{_cpu_model()} ({usable_cores()} cores)"


def model_params(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118
                shape = st.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def step_tokens(recipe: Path) -> int:
    """Tokens of an average micro-batch of these rows: the matmul height of a training step."""
    _, rows, _ = load_rows(recipe)
    return round(BATCH * statistics.mean(len(r.input_ids) for r in rows))


def fastest(flops: dict[str, float]) -> str:
    return max(flops, key=lambda k: flops[k])


def gflops(flops: dict[str, float]) -> str:
    return ", ".join(
        f"{k} {v / 1e9:.1f}" if v else f"{k} not timed (slow)" for k, v in flops.items()
    )


def table(
    results: dict[str, list[dict[str, Any]]], ceilings: dict[str, float], warmup: int
) -> list[str]:
    ref = statistics.median(throughput(r["records"], warmup) for r in results["lorakit_lora"])
    shares = " | ".join(f"share of {k} ceiling" for k in ceilings)
    lines = [
        f"| contender | computes in | useful tokens/s (median, runs) | {shares} "
        "| ratio to lorakit LoRA | s per step | peak memory GB | final train loss |",
        "|---|---|---|" + "---|" * len(ceilings) + "---|---|---|---|",
    ]
    for name, runs in results.items():
        tps = [throughput(r["records"], warmup) for r in runs]
        med = statistics.median(tps)
        steps = [
            (r["records"][-1]["time"] - r["records"][warmup - 1]["time"])
            / (len(r["records"]) - warmup)
            for r in runs
        ]
        rss = [r["peak_rss_gb"] for r in runs if r["peak_rss_gb"]]
        loss = runs[0]["records"][-1]["loss"]
        dtypes = " / ".join(sorted({r["dtype"] for r in runs}))
        share = " | ".join(f"{med / c:.2f}" for c in ceilings.values())
        lines.append(
            f"| {name} | {dtypes} | {med:.1f} ({', '.join(f'{t:.0f}' for t in tps)}) | {share} "
            f"| {med / ref:.2f} | {statistics.median(steps):.2f} | "
            f"{max(rss) if rss else float('nan'):.2f} | {loss:.4f} |"
        )
    return lines


def build_model(size: str) -> Path:
    """The model folder of ``size``, built in a child process on first use (a 1.7B model in
    the parent would stay in its memory beside the contenders)."""
    if size != "135m":
        cmd = [sys.executable, __file__, "--build-model", size]
        if subprocess.run(cmd, check=False).returncode != 0:
            raise SystemExit(f"could not build the {size} model")
    return model_sizes.model_folder(size, RESULTS)


def bench_model(
    label: str,
    model_path: Path | None,
    folder: Path,
    names: list[str],
    args: argparse.Namespace,
    square: dict[str, float],
) -> None:
    """Every contender on one model, round-robin; prints the table and writes the results."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = model_params(folder)
    per_token = 4 * params
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        work = Path(tmp)
        tokens = step_tokens(write_recipe(work, "rows", args.data, "none", 2, model_path))
        # bf16 without bf16 instructions is emulated (~100x slower): not worth timing
        skip = {"bf16"} if device == "cpu" and square["bf16"] < square["fp32"] / 4 else set()
        real, shapes = ceiling.real_shape_flops(config, tokens, device, skip)
        flops = {"square": square, "real shapes": real}
        best = {k: fastest(v) for k, v in flops.items()}
        ceilings = {k: flops[k][best[k]] / per_token for k in flops}
        summary = "; ".join(
            f"{k} matmul GFLOP/s {gflops(flops[k])} -> ceiling ({best[k]} fastest) "
            f"{ceilings[k]:.0f} tokens/s"
            for k in flops
        )
        print(
            f"{label}: {params / 1e6:.1f}M params -> {per_token / 1e6:.0f} MFLOP per training "
            f"token, {tokens} tokens a micro-batch; {summary}",
            flush=True,
        )
        results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for rep in range(args.reps):
            for name in names:
                r = run_contender(name, work, args.data, args.steps, model_path)
                results[name].append(r)
                tps = throughput(r["records"], args.warmup)
                first = r["records"][0]["time"] - r["started"]
                print(
                    f"{label} round {rep + 1} {name} ({r['dtype']}): {tps:.1f} useful tokens/s, "
                    f"first step after {first:.1f} s, peak memory {r['peak_rss_gb']} GB",
                    flush=True,
                )
    lines = table(results, ceilings, args.warmup)
    a = results["lorakit_lora"][0]["records"]
    extra = []
    for other in ("trl", "trl_bf16"):
        if other in results:
            b = results[other][0]["records"]
            diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=False)]
            extra.append(
                f"lorakit vs {other}, same {len(diffs)} steps: max |train loss difference| "
                f"{max(diffs):.2e} (losses {a[-1]['loss']:.4f} vs {b[-1]['loss']:.4f} at the "
                "last step)"
            )
    firsts = [r["records"][0]["time"] - r["started"] for r in results["lorakit_lora"]]
    extra.append(
        f"`lorakit run` to the end of its first step (warm model cache): "
        f"{statistics.median(firsts):.1f} s"
    )
    if "lorakit_qlora" in results:
        q = statistics.median(
            throughput(r["records"], args.warmup) for r in results["lorakit_qlora"]
        )
        lo = statistics.median(
            throughput(r["records"], args.warmup) for r in results["lorakit_lora"]
        )
        extra.append(f"QLoRA NF4 step / LoRA step: {lo / q:.2f}x")
    header = (
        f"bench_train {label} on {device_name()}: {args.steps} steps x {args.reps} rounds, "
        f"warmup {args.warmup}, batch {BATCH}, LoRA r={RANK} on q/k/v/o, data "
        f"{args.data.name}; {params / 1e6:.1f}M params, {tokens} tokens a micro-batch; "
        f"{summary}"
    )
    text = "\n".join([header, "", *lines, "", *extra])
    print("\n" + text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"bench_train-{label}-{stamp}.md").write_text(text + "\n", encoding="utf-8")
    (RESULTS / f"bench_train-{label}-{stamp}.json").write_text(
        json.dumps(
            {
                "model": label,
                "model_folder": str(folder),
                "params": params,
                "step_tokens": tokens,
                "flops": flops,
                "ceilings": ceilings,
                "real_shape_rates": shapes,
                "results": results,
            },
            indent=1,
        ),
        encoding="utf-8",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per contender run")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the speed")
    p.add_argument("--reps", type=int, default=2, help="interleaved rounds")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--only", help="comma-separated contenders (default: all)")
    p.add_argument(
        "--model-size",
        help=f"comma-separated, of {', '.join(model_sizes.SIZES)} (default: 135m)",
    )
    p.add_argument("--model-path", type=Path, help="a local model folder (default: embedded)")
    p.add_argument("--build-model", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.build_model:
        print(f"building {model_sizes.model_folder(args.build_model, RESULTS)}", flush=True)
        return
    if not 1 <= args.warmup < args.steps:
        p.error("--warmup must be at least 1 and below --steps")
    if args.model_path and args.model_size:
        p.error("--model-path and --model-size: pass one")
    sizes = args.model_size.split(",") if args.model_size else ["135m"]
    unknown = [s for s in sizes if s not in model_sizes.SIZES]
    if unknown:
        p.error(f"--model-size {','.join(unknown)}: expected {', '.join(model_sizes.SIZES)}")
    names = args.only.split(",") if args.only else list(CONTENDERS)
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        p.error(f"--only {','.join(unknown)}: expected some of {', '.join(CONTENDERS)}")
    if "lorakit_lora" not in names:
        names.insert(0, "lorakit_lora")
    args.data = args.data.resolve()  # the recipes are written in a temporary folder
    if not args.data.is_file():
        raise SystemExit(f"no data at {args.data}; pass --data")

    # the models first (building one takes minutes), then the matmul rates of this device;
    # (label, the recipe's model path or None for the embedded plugin, model folder)
    if args.model_path:
        path = args.model_path.resolve()
        models = [(path.name, path, path)]
    else:
        folders = {s: build_model(s) for s in sizes}
        models = [(s, None if s == "135m" else folders[s], folders[s]) for s in sizes]
    import torch
    from lorakit.device import configure_threads

    if not torch.cuda.is_available():
        configure_threads()
    square = ceiling.square_flops("cuda" if torch.cuda.is_available() else "cpu")
    for label, model_path, folder in models:
        bench_model(label, model_path, folder, names, args, square)


if __name__ == "__main__":
    main()
