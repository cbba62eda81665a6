"""The GPU paths of `lorakit run`, each really run: one GPU, torchrun, FSDP through accelerate.

    python benchmarks/gpu_paths.py [--model-path DIR] [--steps 30] [--only lora,fsdp]
        [--nproc N] [--data FILE] [--batch 8] [--max-length 192]

Needs a CUDA GPU. Every path trains the same recipe (LoRA r=16 on all linear layers, the demo
task's data unless ``--data`` names a chat JSONL file) on the embedded SmolLM2-135M-Instruct, or
on the model folder ``--model-path`` (anything ``save_pretrained`` wrote). Paths:

    lora         lorakit run; the base in the compute dtype ``auto`` picks (bf16 where supported)
    qlora        lorakit run with the base in 4-bit NF4 (bitsandbytes CUDA kernels)
    nproc        lorakit run --nproc N (torchrun, nccl, one rank per GPU)
    fsdp         accelerate launch --config_file configs/accelerate_fsdp_lora.yaml
                 --num_processes N -m lorakit.cli.main run ... (FSDP2 shards the base)
    fsdp_qlora   the same with the 4-bit base (stored in the compute dtype, so FSDP can shard it)
    fsdp_resume  an FSDP run SIGKILLed once its first checkpoint is complete, then
                 --resume-from-checkpoint auto

For each path: exit status, the engine the run reports (accelerate's distributed type), the
median seconds per optimizer step and tokens per second after the warm-up steps (a step that
also evaluated or wrote a checkpoint is not a training step's speed), peak GPU
memory (torch max allocated, rank 0) against `lorakit plan`'s prediction for the training step,
final train loss and val loss, and whether stock PEFT loads the saved adapter on the GPU and
generates with it. Prints a table and writes it, with the raw numbers, to
benchmarks/results/gpu_paths-<time>.md and .json.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PATHS = ("lora", "qlora", "nproc", "fsdp", "fsdp_qlora", "fsdp_resume")
FSDP_CONFIG = REPO / "configs" / "accelerate_fsdp_lora.yaml"

RECIPE = """
[model]
{model}
[[data.sources]]
plugin = "chat_jsonl"
path = "{data}"
[data]
val_fraction = 0.1
test_fraction = 0.0
[quant]
plugin = "{quant}"
[peft]
plugin = "lora"
r = 16
alpha = 32
dropout = 0.05
target_modules = "all-linear"
[train]
max_steps = {steps}
per_device_train_batch_size = {batch}
learning_rate = 2e-4
lr_scheduler_type = "linear"
logging_steps = 1
eval_steps = {half}
save_steps = {half}
max_length = {max_length}
seed = 42
[eval]
metrics = ["eval_loss", "json_valid"]
splits = ["val"]
max_examples = 16
max_new_tokens = 24
baseline = false
[output]
dir = "{out}"
name = "{name}"
"""


def write_recipe(folder: Path, name: str, args: argparse.Namespace, quant: str) -> Path:
    model = (
        f'plugin = "local"\npath = "{args.model_path}"'
        if args.model_path
        else 'plugin = "smollm2-135m-instruct"'
    )
    path = folder / f"{name}.toml"
    path.write_text(
        RECIPE.format(
            model=model,
            data=args.data,
            quant=quant,
            steps=args.steps,
            half=max(1, args.steps // 2),
            batch=args.batch,
            max_length=args.max_length,
            out=folder / "runs",
            name=name,
        ),
        encoding="utf-8",
    )
    return path


def command(path: str, recipe: Path, nproc: int) -> list[str]:
    lorakit = [sys.executable, "-m", "lorakit.cli.main", "run", str(recipe)]
    if path in ("lora", "qlora"):
        return lorakit
    if path == "nproc":
        return [*lorakit, "--nproc", str(nproc)]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(FSDP_CONFIG),
        "--num_processes",
        str(nproc),
        "-m",
        "lorakit.cli.main",
        "run",
        str(recipe),
    ]


def run_logged(cmd: list[str], log: Path, kill_when: Path | None = None) -> tuple[int, float]:
    """Run ``cmd``; SIGKILL it and everything it started once ``kill_when`` exists."""
    started = time.time()
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if kill_when is not None and kill_when.exists():
                # the launcher and every process under it (torchrun's workers run in sessions
                # of their own): what a scheduler does when a job's node fails
                for pid in [proc.pid, *descendants(proc.pid)]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait()
                out.write(f"[gpu_paths] SIGKILLed the job once {kill_when} existed\n")
                break
            time.sleep(0.05)
    return proc.returncode, time.time() - started


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def metrics(run_dir: Path, warmup: int) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r and "time" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    out: dict[str, Any] = {
        "final_loss": train[-1]["loss"] if train else None,
        "eval_loss": evals[-1] if evals else None,
        "peak_memory_gb": max((r.get("peak_memory_gb") or 0) for r in rows),
    }
    timed = [r for r in train if r["step"] >= warmup]
    # the median step: steps that also evaluated or wrote a checkpoint are not training speed
    steps = [
        (
            b["time"] - a["time"],
            b.get("num_input_tokens_seen", 0) - a.get("num_input_tokens_seen", 0),
        )
        for a, b in itertools.pairwise(timed)
        if b["step"] == a["step"] + 1
    ]
    if steps:
        out["s_per_step"] = statistics.median(dt for dt, _ in steps)
        out["tokens_per_s"] = statistics.median(n / dt for dt, n in steps if dt > 0)
    return out


def predicted_train_peak_gb(recipe_path: Path) -> float | None:
    try:
        from lorakit.catalog import default_catalog
        from lorakit.components import build_components
        from lorakit.preflight import plan_recipe
        from lorakit.recipe import load_recipe

        catalog = default_catalog()
        recipe = load_recipe(recipe_path, catalog=catalog)
        plan, _ = plan_recipe(recipe, build_components(recipe, catalog), "cuda")
        return float(plan.train_peak) / 2**30
    except Exception as exc:  # the table says so; the run itself is what is measured
        print(f"plan failed for {recipe_path.name}: {exc}", file=sys.stderr)
        return None


def peft_generates(base: str, adapter: Path) -> str:
    """Load the base and the saved adapter with stock transformers + PEFT on the GPU; generate."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(adapter))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map="cuda")
    model = PeftModel.from_pretrained(model, str(adapter))
    ids = tok("Hello", return_tensors="pt").to("cuda")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0][ids["input_ids"].shape[1] :])
    del model
    torch.cuda.empty_cache()
    return f"yes ({len(text)} chars)"


def base_folder(args: argparse.Namespace) -> str:
    if args.model_path:
        return str(args.model_path)
    from lorakit_plugins.models.smollm2 import ensure_cached

    return str(ensure_cached())


def run_path(path: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    quant = "bnb-4bit" if "qlora" in path else "none"
    name = f"{path}-{time.time_ns()}"
    recipe = write_recipe(folder, name, args, quant)
    log = folder / f"{name}.log"
    cmd = command(path, recipe, args.nproc)
    run_dir = folder / "runs" / name
    result: dict[str, Any] = {"path": path, "log": str(log)}
    if path == "fsdp_resume":
        first = run_dir / "checkpoints" / f"checkpoint-{max(1, args.steps // 2)}"
        code, _ = run_logged(cmd, log, kill_when=first / "LORAKIT_COMPLETE")
        result["killed"] = code != 0
        cmd = [*cmd, "--resume-from-checkpoint", "auto"]
    code, seconds = run_logged(cmd, log)
    text = log.read_text(errors="replace")
    result.update(exit=code, seconds=round(seconds, 1))
    result["engine"] = next(
        (line.split("engine:", 1)[1].strip() for line in text.splitlines() if "engine:" in line),
        "one process",
    )
    if path == "fsdp_resume":
        result["resumed"] = "resuming" in text
    result["predicted_train_peak_gb"] = predicted_train_peak_gb(recipe)
    if code == 0:
        result.update(metrics(run_dir, args.warmup))
        if not args.no_load_check:
            try:
                result["peft_loads"] = peft_generates(base_folder(args), run_dir / "adapter")
            except Exception as exc:
                result["peft_loads"] = f"no: {type(exc).__name__}: {exc}"
    else:
        result["tail"] = text[-4000:]
    return result


def fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| path | exit | engine | s/step | tokens/s | peak GB (plan) | final loss | val loss "
        "| stock PEFT loads + generates |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        peak = f"{fmt(r.get('peak_memory_gb'), '.2f')} ({fmt(r['predicted_train_peak_gb'], '.2f')})"
        lines.append(
            f"| {r['path']} | {r['exit']} | {r['engine']} | {fmt(r.get('s_per_step'))} "
            f"| {fmt(r.get('tokens_per_s'), '.0f')} | {peak} | {fmt(r.get('final_loss'), '.4f')} "
            f"| {fmt(r.get('eval_loss'), '.4f')} | {r.get('peft_loads', '-')} |"
        )
    return lines


def environment() -> dict[str, str]:
    import torch

    info = {"torch": torch.__version__, "cuda": str(torch.version.cuda)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = str(torch.cuda.device_count())
    for name in ("transformers", "peft", "trl", "accelerate", "bitsandbytes"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:
            info[name] = f"missing ({type(exc).__name__})"
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-path", type=Path, help="a local model folder (default: embedded)")
    p.add_argument("--data", type=Path, default=REPO / "examples/demo_task/data/requests.jsonl")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the speed")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--nproc", type=int, default=0, help="ranks for nproc/fsdp (default: GPUs)")
    p.add_argument("--only", help="comma-separated paths (default: all)")
    p.add_argument("--work", type=Path, help="folder for recipes, logs and runs (default: temp)")
    p.add_argument("--no-load-check", action="store_true", help="skip the stock PEFT reload")
    args = p.parse_args()
    import tempfile

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_paths needs a CUDA GPU (torch.cuda.is_available() is False)")
    args.nproc = args.nproc or torch.cuda.device_count()
    if not args.data.is_file():
        raise SystemExit(f"{args.data} is missing (python examples/demo_task/make_data.py)")
    chosen = args.only.split(",") if args.only else list(PATHS)
    unknown = sorted(set(chosen) - set(PATHS))
    if unknown:
        raise SystemExit(f"unknown path(s) {unknown}; choose from {', '.join(PATHS)}")
    folder = args.work or Path(tempfile.mkdtemp(prefix="gpu_paths-"))
    folder.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(json.dumps(env), flush=True)
    results = []
    for path in chosen:
        result = run_path(path, folder, args)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "tail"}), flush=True)
        if "tail" in result:
            print(result["tail"], flush=True)
    lines = table(results)
    print("\n".join(lines))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    head = [f"# gpu_paths {stamp}", "", f"environment: {json.dumps(env)}", ""]
    settings = (
        f"steps {args.steps}, batch {args.batch}, max_length {args.max_length}, nproc {args.nproc}"
    )
    (out / f"gpu_paths-{stamp}.md").write_text("\n".join([*head, settings, "", *lines, ""]))
    (out / f"gpu_paths-{stamp}.json").write_text(
        json.dumps({"environment": env, "args": vars(args), "results": results}, default=str)
    )


if __name__ == "__main__":
    main()
