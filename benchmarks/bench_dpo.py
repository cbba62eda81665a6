"""DPO (or KTO) speed and memory: lorakit's preference step against TRL's DPOTrainer (or
KTOTrainer) on the same pairs.

    PYTHONPATH=core:plugins .venv/bin/python benchmarks/bench_dpo.py [--steps 6] [--reps 1]
        [--model-path DIR] [--dtype fp32|bf16] [--objective dpo|kto] [--reference auto|both]
        [--accumulation 1|2|4] [--merge on|off]

Both train the same model (default: the embedded SmolLM2-135M-Instruct, converted once by
``lorakit run``'s smollm2 plugin into $LORAKIT_CACHE) with LoRA r=16 (alpha 32, dropout 0.05) on
q/k/v/o, 4 pairs a step, AdamW lr 5e-6, beta 0.1, sigmoid loss, on CPU, gradient
checkpointing off, on ``steps x 4`` pairs of the demo-style task (correct JSON chosen, a near
miss rejected): one epoch, so every pair is trained once. ``--dtype fp32`` (default): both
compute in fp32. ``--dtype bf16``: what each does on a CPU with fast bf16 (AMX, AVX512-BF16):
lorakit's base weights and matmuls in bf16 (its ``auto`` there), TRL's ``bf16=True`` (fp32
weights under bf16 autocast, TRL's default).

The clock covers what each needs to train those pairs: for lorakit the reference
log-probabilities (computed once before step 1 in fp32; in each step in bf16, lorakit's
``reference_logps = "auto"``; ``--reference both`` runs ``every_step`` and ``once`` as two
contenders) plus the steps; for TRL the steps (its reference forward runs inside each step).
Model loading, data preparation, the trainer's construction (TRL's constructor, lorakit's
``build_preference_trainer``/``build_kto_trainer``, printed as "build") and evaluation are
outside it. (Until 2026-12-07 lorakit's construction, about 0.5 s, was inside its clock.) Tokens are both sides of every pair (prompt + answer), the same count for both.
``--objective kto``: each pair is one desirable and one undesirable answer (lorakit reads the
pairs file as KTO data; TRL gets the same answers as unpaired rows, each pair's two in a row),
8 answers a step, TRL's ``kto`` loss with its KL estimate on both sides; TRL's KTOTrainer
walks its data in order (its KL rows are built from fixed neighbours) where lorakit shuffles,
so the two loss curves see the answers in another order and agree only at the first step.
``--accumulation A`` (DPO): the step's 4 pairs as A micro-batches of 4/A pairs, for both
(lorakit then merges them on CPU, ``train.merge_micro_batches``; ``--merge off`` runs them
apart).
Throughput is given per wall-clock second and per CPU second of
the timed span (``time.process_time``, all threads): on a shared machine the CPU time is the
steadier one. Peak memory is each process's peak RSS. Each contender runs in its own process, one after the
other, interleaved for ``--reps`` rounds. Prints ratios (lorakit / TRL).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "core"), str(REPO / "plugins"), str(REPO / "tests")]


def pairs_file(folder: Path, n: int) -> Path:
    from helpers import preference_records, write_jsonl

    return write_jsonl(folder / "pairs.jsonl", preference_records(n, seed=3))


def model_path(arg: str | None) -> str:
    if arg:
        return arg
    from lorakit.catalog import default_catalog

    entry = default_catalog().get("model", "smollm2-135m-instruct")
    return entry.factory(entry.options_class()).resolve().path


def run_lorakit(
    folder: Path,
    model: str,
    steps: int,
    dtype: str,
    objective: str,
    reference: str = "auto",
    accumulation: int = 1,
    merge: str = "on",
) -> dict:
    from lorakit import catalog, runner

    if "preference_jsonl" not in catalog.default_catalog().entries["source"]:
        import lorakit_plugins.sources.preference_jsonl as module

        catalog._DEFAULT = catalog.build_catalog(catalog.make_manager([module]))
    recipe = folder / "dpo.toml"
    recipe.write_text(
        f"""
[model]
plugin = "local"
path = "{model}"
[quant]
plugin = "none"
dtype = "{dtype}"
[peft]
r = 16
alpha = 32
dropout = 0.05
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
[train]
objective = "{objective}"
reference_logps = "{reference}"
beta = 0.1
max_steps = {steps}
per_device_train_batch_size = {(4 if objective == "dpo" else 8) // accumulation}
gradient_accumulation_steps = {accumulation}
merge_micro_batches = {"true" if merge == "on" else "false"}
per_device_eval_batch_size = 4
learning_rate = 5e-6
save_steps = 1000
max_length = 512
seed = 42
[data]
val_fraction = 0.0
test_fraction = 0.0
[[data.sources]]
plugin = "preference_jsonl"
path = "{folder / "pairs.jsonl"}"
[eval]
baseline = false
[output]
dir = "{folder / "runs"}"
name = "lorakit"
"""
    )
    import lorakit.kto_training as kto_training
    import lorakit.preference_training as preference_training

    timed = {"build_seconds": 0.0, "build_cpu_seconds": 0.0}
    train = runner.train

    def timed_train(*args, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        out = train(*args, **kwargs)
        timed["seconds"] = time.perf_counter() - start
        timed["cpu_seconds"] = time.process_time() - cpu
        return out

    def timed_build(build):
        # the trainer's construction: outside the clock, as TRL's constructor is outside its
        def wrapped(*args, **kwargs):
            start, cpu = time.perf_counter(), time.process_time()
            out = build(*args, **kwargs)
            timed["build_seconds"] += time.perf_counter() - start
            timed["build_cpu_seconds"] += time.process_time() - cpu
            return out

        return wrapped

    runner.train = timed_train
    for module, name in (
        (preference_training, "build_preference_trainer"),
        (kto_training, "build_kto_trainer"),
    ):
        setattr(module, name, timed_build(getattr(module, name)))
    from lorakit.cli.main import main

    code = main(["run", str(recipe)])
    assert code == 0
    rows = [json.loads(x) for x in (folder / "runs/lorakit/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {
        "seconds": timed["seconds"] - timed["build_seconds"],
        "cpu_seconds": timed["cpu_seconds"] - timed["build_cpu_seconds"],
        "build_seconds": timed["build_seconds"],
        "losses": losses,
    }


def run_trl(
    folder: Path, model: str, steps: int, dtype: str, objective: str, accumulation: int = 1
) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    records = [json.loads(x) for x in (folder / "pairs.jsonl").read_text().splitlines()]
    if objective == "dpo":
        rows = [
            {
                "prompt": r["prompt"],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in records
        ]
    else:  # each pair: its chosen answer desirable, its rejected one undesirable
        rows = [
            {
                "prompt": r["prompt"],
                "completion": [{"role": "assistant", "content": r[side]}],
                "label": side == "chosen",
            }
            for r in records
            for side in ("chosen", "rejected")
        ]
    data = Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(model)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    config, trainer_class, extra = {
        "dpo": (
            DPOConfig,
            DPOTrainer,
            {"loss_type": ["sigmoid"], "per_device_train_batch_size": 4 // accumulation},
        ),
        "kto": (KTOConfig, KTOTrainer, {"loss_type": "kto", "per_device_train_batch_size": 8}),
    }[objective]
    args = config(
        output_dir=str(folder / "trl"),
        max_steps=steps,
        learning_rate=5e-6,
        beta=0.1,
        max_length=512,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=dtype == "bf16",  # fp32 weights, bf16 autocast: TRL's default where bf16 exists
        gradient_checkpointing=False,
        seed=42,
        dataloader_num_workers=0,
        gradient_accumulation_steps=accumulation,
        **extra,
    )
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    trainer = trainer_class(
        model=base, args=args, train_dataset=data, processing_class=tok, peft_config=lora
    )
    start, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "losses": losses}


def tokens_of(folder: Path, model: str) -> int:
    """Both sides of every pair, as lorakit renders them (the model's chat template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    total = 0
    for line in (folder / "pairs.jsonl").read_text().splitlines():
        r = json.loads(line)
        for answer in (r["chosen"], r["rejected"]):
            msgs = [*r["prompt"], {"role": "assistant", "content": answer}]
            total += len(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))
    return total


def child(
    which: str,
    folder: Path,
    model: str,
    steps: int,
    dtype: str,
    objective: str,
    accumulation: int,
    merge: str,
) -> None:
    if which == "trl":
        out = run_trl(folder, model, steps, dtype, objective, accumulation)
    else:  # lorakit (its auto), lorakit_once, lorakit_every_step
        reference = which.removeprefix("lorakit").removeprefix("_") or "auto"
        out = run_lorakit(folder, model, steps, dtype, objective, reference, accumulation, merge)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--model-path")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--objective", choices=["dpo", "kto"], default="dpo")
    ap.add_argument(
        "--reference",
        choices=["auto", "both"],
        default="auto",
        help="lorakit's train.reference_logps: its auto (bf16: every_step, fp32: once), or "
        "both every_step and once as two contenders",
    )
    ap.add_argument(
        "--accumulation",
        type=int,
        choices=[1, 2, 4],
        default=1,
        help="DPO: the 4 pairs of a step as this many micro-batches (default 1)",
    )
    ap.add_argument("--merge", choices=["on", "off"], default="on")
    ap.add_argument("--child", choices=["lorakit", "lorakit_once", "lorakit_every_step", "trl"])
    ap.add_argument("--folder")
    args = ap.parse_args()
    if args.child:
        child(
            args.child,
            Path(args.folder),
            args.model_path,
            args.steps,
            args.dtype,
            args.objective,
            args.accumulation,
            args.merge,
        )
        return
    if args.accumulation > 1 and args.objective != "dpo":
        ap.error("--accumulation is for --objective dpo")
    model = model_path(args.model_path)
    mine = ["lorakit_every_step", "lorakit_once"] if args.reference == "both" else ["lorakit"]
    results: dict[str, list[dict]] = {k: [] for k in (*mine, "trl")}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for which in results:
                folder = Path(tmp) / f"{which}-{rep}"
                folder.mkdir()
                pairs_file(folder, args.steps * 4)
                cmd = [sys.executable, __file__, "--child", which, "--folder", str(folder)]
                cmd += ["--model-path", model, "--steps", str(args.steps), "--dtype", args.dtype]
                cmd += ["--objective", args.objective, "--accumulation", str(args.accumulation)]
                cmd += ["--merge", args.merge]
                env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{which} failed:\n{proc.stderr[-3000:]}")
                res = json.loads(line[7:])
                res["tokens"] = tokens_of(folder, model)
                results[which].append(res)
                build = f", build {res['build_seconds']:.2f} s" if "build_seconds" in res else ""
                print(
                    f"{which}: {res['tokens'] / res['seconds']:.0f} tokens/s "
                    f"({res['seconds']:.1f} s, {res['cpu_seconds']:.1f} s CPU{build}), "
                    f"peak RSS {res['peak_rss_mb']:.0f} MB, "
                    f"losses {[round(x, 4) for x in res['losses']]}"
                )
    best = {k: max(r["tokens"] / r["seconds"] for r in v) for k, v in results.items()}
    cpu = {k: max(r["tokens"] / r["cpu_seconds"] for r in v) for k, v in results.items()}
    rss = {k: min(r["peak_rss_mb"] for r in v) for k, v in results.items()}
    for k in mine:
        print(
            f"{k} / TRL: throughput x{best[k] / best['trl']:.2f} (wall clock), "
            f"x{cpu[k] / cpu['trl']:.2f} (per CPU second), "
            f"peak RSS x{rss[k] / rss['trl']:.2f} ({args.objective}, {args.steps} steps of "
            f"4 pairs in {args.accumulation} micro-batch(es), merge {args.merge}, "
            f"{args.reps} round(s), {args.dtype}, "
            f"CPU threads {os.environ.get('OMP_NUM_THREADS', 'all')})"
        )


if __name__ == "__main__":
    main()
