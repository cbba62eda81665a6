"""Training speed: lorakit against TRL, a pad-to-512 Trainer script and a hand-written loop.

    .venv/bin/python benchmarks/bench_train.py [--steps 8] [--warmup 2] [--reps 2]
        [--data ../shared/data/alpaca_seed_chat.jsonl] [--only lorakit_lora,trl]
        [--model-path DIR]

Every contender trains the embedded SmolLM2-135M-Instruct (or the local model folder
``--model-path``) with LoRA r=16 (alpha 32, dropout
0.05) on q/k/v/o, micro-batch 4, AdamW lr 2e-4 (linear), seed 42, on the same tokenized rows:
lorakit's chat-template rendering with completion-only labels (so "same data" means the same
tokens and the same supervised positions for all of them). Contenders:

    lorakit_lora     `lorakit run` (packed rows, supervised-only head), compute dtype auto
                     (the fastest this machine has: fp32 on CPUs without fast bf16)
    lorakit_qlora    `lorakit run` with the base in 4-bit NF4 (+ double quant)
    lorakit_return   `lorakit run` with LORAKIT_MALLOC=return: freed tensor memory goes back to
                     the OS at once (lower peak RSS on CPU); what that costs in step time
    trl              TRL SFTTrainer, gradient checkpointing off (rows padded per batch); bf16 off
                     on CPU, on a GPU the base in bf16 with bf16=True (what TRL's docs use)
    trl_packing      the same with TRL's packing (BFD, padding-free), 1 row of 1024 tokens a step
    pad512           transformers Trainer, every row padded (or cut) to 512: what most
                     hand-written fine-tuning scripts do
    hand_loop        a plain PyTorch + PEFT loop, rows padded to the batch maximum

Each contender runs in its own process, one after the other (never two at once: on 2 cores two
trainers slow each other ~8x), interleaved round-robin for ``--reps`` rounds. A contender's speed
is useful (non-padding) tokens per second over the steps after ``--warmup``; peak memory is the
contender process's own peak RSS on CPU, CUDA max allocated on a GPU. The matmul FLOP/s
of fp32 and bf16 are measured in the same run (on the GPU when there is one); the ceiling is the
fastest dtype's FLOP/s divided by the FLOPs of one LoRA training token (4 x parameters:
forward, and backward to the inputs). On a GPU every contender computes in bf16 (the base
weights in bf16, as lorakit's ``auto`` does there).

Prints a table and writes it, with the raw numbers, to benchmarks/results/bench_train-<time>.md
and .json. Run it on a quiet machine.
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

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_seed_chat.jsonl"
CONTENDERS = (
    "lorakit_lora",
    "lorakit_qlora",
    "lorakit_return",
    "trl",
    "trl_packing",
    "pad512",
    "hand_loop",
)
SEED, BATCH, LR, RANK, ALPHA, DROPOUT = 42, 4, 2e-4, 16, 32, 0.05
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MAX_LENGTH = 2048

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


MODEL_PATH: Path | None = None  # --model-path: a local model folder instead of the embedded one


def write_recipe(folder: Path, name: str, data: Path, quant: str, steps: int) -> Path:
    path = folder / f"{name}.toml"
    model = (
        f'plugin = "local"\npath = "{MODEL_PATH}"'
        if MODEL_PATH
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


# ---------------------------------------------------------------------------------------------
# Workers (run in a child process): each prints one JSON line {"steps": [...]} with per-step
# end time, useful tokens and loss.


def _rows(recipe_path: Path) -> tuple[Any, list[Any], str]:
    from lorakit.catalog import default_catalog
    from lorakit.components import build_components
    from lorakit.data.pipeline import DataReport, load_splits, tokenize_examples
    from lorakit.modeling import load_tokenizer, resolve_model
    from lorakit.recipe import load_recipe

    catalog = default_catalog()
    recipe = load_recipe(recipe_path, catalog=catalog)
    components = build_components(recipe, catalog)
    ref = resolve_model(components.model_source)
    tok = load_tokenizer(ref, recipe_dir=recipe.recipe_dir)
    splits = load_splits(components.sources, recipe.data, recipe.recipe_dir, DataReport())
    formatter = components.formatter
    rows = tokenize_examples(splits.train, formatter, tok, MAX_LENGTH, "drop", DataReport())
    return tok, rows, ref.path


def _peft_model(path: str) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.bfloat16 if cuda else torch.float32,
        device_map="cuda" if cuda else None,
    )
    torch.manual_seed(SEED)
    config = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=DROPOUT,
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _step_recorder(records: list[dict[str, Any]]) -> Any:
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                records.append(
                    {
                        "step": state.global_step,
                        "time": time.time(),
                        "tokens": state.num_input_tokens_seen,
                        "loss": logs["loss"],
                    }
                )

    return Recorder()


def worker_trainer(kind: str, recipe_path: Path, steps: int) -> list[dict[str, Any]]:
    import torch
    from datasets import Dataset

    tok, rows, path = _rows(recipe_path)
    model = _peft_model(path)
    records: list[dict[str, Any]] = []
    common = dict(
        output_dir=tempfile.mkdtemp(),
        seed=SEED,
        data_seed=SEED,
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    if kind == "pad512":
        from transformers import Trainer

        def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
            n = 512
            ids = torch.full((len(batch), n), tok.pad_token_id)
            labels = torch.full((len(batch), n), -100)
            mask = torch.zeros((len(batch), n), dtype=torch.long)
            for i, row in enumerate(batch):
                k = min(n, len(row["input_ids"]))
                ids[i, :k] = torch.tensor(row["input_ids"][:k])
                labels[i, :k] = torch.tensor(row["labels"][:k])
                mask[i, :k] = 1
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}

        from transformers import TrainingArguments

        data = Dataset.from_dict(
            {"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]}
        )
        trainer: Any = Trainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=data,
            data_collator=collate,
            callbacks=[_step_recorder(records)],
        )
    else:
        from trl import SFTConfig, SFTTrainer

        packing = kind == "trl_packing"
        if packing:
            # padding-free rows carry no attention mask, and "non_padding" would then count
            # input_ids != pad id: SmolLM2's pad is <|im_end|>, which ends every turn
            common["include_num_input_tokens_seen"] = "all"
        data = Dataset.from_dict(
            {"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]}
        )
        if packing:
            # TRL packs examples into max_length rows; 1 row of 1024 tokens a step is about the
            # tokens of 4 unpacked examples here (4 rows would make each step ~5x bigger)
            common["per_device_train_batch_size"] = 1
        args = SFTConfig(
            **common,
            gradient_checkpointing=False,
            max_length=MAX_LENGTH if not packing else 1024,
            packing=packing,
            packing_strategy="bfd",
            dataset_kwargs={"skip_prepare_dataset": not packing},
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tok,
            callbacks=[_step_recorder(records)],
        )
    trainer.train()
    return records


def worker_hand_loop(recipe_path: Path, steps: int) -> list[dict[str, Any]]:
    """What a careful user writes in 40 lines: PEFT model, AdamW, pad to the batch maximum."""
    import torch

    tok, rows, path = _rows(recipe_path)
    model = _peft_model(path).train()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    generator = torch.Generator().manual_seed(SEED)
    order: list[int] = []
    while len(order) < steps * BATCH:  # a new shuffle per pass over the data
        order += torch.randperm(len(rows), generator=generator).tolist()
    records, seen = [], 0
    for step in range(steps):
        batch = [rows[i] for i in order[step * BATCH : (step + 1) * BATCH]]
        n = max(len(r.input_ids) for r in batch)
        ids = torch.full((len(batch), n), tok.pad_token_id)
        labels = torch.full((len(batch), n), -100)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
            labels[i, : len(r.labels)] = torch.tensor(r.labels)
            mask[i, : len(r.input_ids)] = 1
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seen += int(mask.sum())
        records.append({"step": step + 1, "time": time.time(), "tokens": seen, "loss": loss.item()})
    return records


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


def run_contender(name: str, folder: Path, data: Path, steps: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if name == "lorakit_return":
        env["LORAKIT_MALLOC"] = "return"
    quant = "bnb-4bit" if name == "lorakit_qlora" else "none"
    tag = f"{name}-{time.time_ns()}"
    recipe = write_recipe(folder, tag, data, quant, steps)
    if name.startswith("lorakit"):
        cmd = [sys.executable, "-m", "lorakit.cli.main", "run", str(recipe)]
    else:
        cmd = [sys.executable, __file__, "--worker", name, "--recipe", str(recipe)]
        cmd += ["--steps", str(steps)]
        if MODEL_PATH:
            cmd += ["--model-path", str(MODEL_PATH)]
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
    else:
        records = json.loads(log_out.read_text().strip().splitlines()[-1])
    # on a GPU the process reports CUDA max allocated; on CPU its own peak RSS (wait4) is exact
    rss = round(usage.ru_maxrss / 1024 / 1024, 2)
    if torch_cuda_available():
        rss = round(records[-1]["peak_memory_gb"], 2)
    return {"name": name, "started": started, "records": records, "peak_rss_gb": rss}


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def throughput(records: list[dict[str, Any]], warmup: int) -> float:
    first = next(r for r in records if r["step"] == warmup)
    last = records[-1]
    return (last["tokens"] - first["tokens"]) / (last["time"] - first["time"])


def cuda_matmul_flops(dtype: Any, size: int = 8192, reps: int = 10) -> float:
    import torch

    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * reps / (time.perf_counter() - start)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    from lorakit.device import _cpu_model, usable_cores

    return f"{_cpu_model()} ({usable_cores()} cores)"


def measure_flops() -> dict[str, float]:
    import torch
    from lorakit.device import configure_threads, matmul_flops

    if torch.cuda.is_available():
        return {"fp32": cuda_matmul_flops(torch.float32), "bf16": cuda_matmul_flops(torch.bfloat16)}

    configure_threads()
    fp32 = max(matmul_flops(torch.float32, size=n, seconds=1.0) for n in (1024, 2048))
    # without bf16 instructions a 1024^3 bf16 matmul takes seconds: measure a smaller one
    bf16 = matmul_flops(torch.bfloat16, size=256, seconds=0.5)
    if bf16 > fp32 / 4:
        bf16 = max(bf16, matmul_flops(torch.bfloat16, size=1024, seconds=1.0))
    return {"fp32": fp32, "bf16": bf16}


def model_params() -> int:
    from lorakit_plugins.models.smollm2 import ensure_cached
    from safetensors import safe_open

    total = 0
    folder = MODEL_PATH or ensure_cached()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118
                shape = st.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def table(results: dict[str, list[dict[str, Any]]], ceiling: float, warmup: int) -> list[str]:
    ref = statistics.median(throughput(r["records"], warmup) for r in results["lorakit_lora"])
    lines = [
        "| contender | useful tokens/s (median, runs) | share of ceiling | ratio to lorakit LoRA "
        "| s per step | peak memory GB | final train loss |",
        "|---|---|---|---|---|---|---|",
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
        lines.append(
            f"| {name} | {med:.1f} ({', '.join(f'{t:.0f}' for t in tps)}) | {med / ceiling:.2f} "
            f"| {med / ref:.2f} | {statistics.median(steps):.2f} | "
            f"{max(rss) if rss else float('nan'):.2f} | {loss:.4f} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per contender run")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the speed")
    p.add_argument("--reps", type=int, default=2, help="interleaved rounds")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--only", help="comma-separated contenders (default: all)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--recipe", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model-path", type=Path, help="a local model folder (default: embedded)")
    args = p.parse_args()
    global MODEL_PATH
    MODEL_PATH = args.model_path
    if not 1 <= args.warmup < args.steps:
        p.error("--warmup must be at least 1 and below --steps")

    if args.worker:
        from lorakit.device import configure_threads

        configure_threads()
        if args.worker == "hand_loop":
            records = worker_hand_loop(args.recipe, args.steps)
        else:
            records = worker_trainer(args.worker, args.recipe, args.steps)
        from lorakit.device import peak_memory_gb

        records[-1]["peak_memory_gb"] = peak_memory_gb()
        print(json.dumps(records))
        return

    args.data = args.data.resolve()  # the recipes are written in a temporary folder
    if not args.data.is_file():
        raise SystemExit(f"no data at {args.data}; pass --data")
    names = args.only.split(",") if args.only else list(CONTENDERS)
    if "lorakit_lora" not in names:
        names.insert(0, "lorakit_lora")
    flops = measure_flops()
    params = model_params()
    per_token = 4 * params
    best = max(flops, key=lambda k: flops[k])
    ceiling = flops[best] / per_token
    print(
        f"matmul fp32 {flops['fp32'] / 1e9:.1f} GFLOP/s, bf16 {flops['bf16'] / 1e9:.1f} GFLOP/s;"
        f" {params / 1e6:.1f}M params -> {per_token / 1e6:.0f} MFLOP per training token;"
        f" ceiling ({best}) {ceiling:.0f} tokens/s",
        flush=True,
    )
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        folder = Path(tmp)
        for rep in range(args.reps):
            for name in names:
                r = run_contender(name, folder, args.data, args.steps)
                results[name].append(r)
                tps = throughput(r["records"], args.warmup)
                first = r["records"][0]["time"] - r["started"]
                print(
                    f"round {rep + 1} {name}: {tps:.1f} useful tokens/s, first step after "
                    f"{first:.1f} s, peak memory {r['peak_rss_gb']} GB",
                    flush=True,
                )
    lines = table(results, ceiling, args.warmup)
    a = results["lorakit_lora"][0]["records"]
    extra = []
    if "trl" in results:
        b = results["trl"][0]["records"]
        diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=False)]
        extra.append(
            f"lorakit vs TRL, same {len(diffs)} steps: max |train loss difference| "
            f"{max(diffs):.2e} (losses {a[-1]['loss']:.4f} vs {b[-1]['loss']:.4f} at the last step)"
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
        f"bench_train on {device_name()}: {args.steps} steps x {args.reps} rounds, warmup "
        f"{args.warmup}, batch "
        f"{BATCH}, LoRA r={RANK} on q/k/v/o, data {args.data.name}; matmul fp32 "
        f"{flops['fp32'] / 1e9:.1f} / bf16 {flops['bf16'] / 1e9:.1f} GFLOP/s, ceiling ({best}) "
        f"{ceiling:.0f} tokens/s"
    )
    text = "\n".join([header, "", *lines, "", *extra])
    print("\n" + text)
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"bench_train-{stamp}.md").write_text(text + "\n", encoding="utf-8")
    (out / f"bench_train-{stamp}.json").write_text(
        json.dumps({"flops": flops, "params": params, "results": results}, indent=1),
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
