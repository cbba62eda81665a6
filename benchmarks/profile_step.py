"""Where a training step's time goes: lorakit's step on real data, timed and profiled.

    .venv/bin/python benchmarks/profile_step.py [--dtype bf16|fp32] [--quant none|bnb-4bit]
        [--steps 10] [--profile] [--shapes] [--data ../shared/data/alpaca_seed_chat.jsonl]
        [--model-path DIR | --model-size 135m-narrow]

Builds the embedded SmolLM2-135M-Instruct with LoRA r=16 on q/k/v/o as `lorakit run` does (the
recipe's quant backend and compute dtype, k-bit preparation, fast dropout, fused LoRA layers,
fused RMSNorm, packed attention), then runs the step by hand: packed micro-batches of 4
examples (``--batch``) in a seeded order, the supervised-only loss, backward, clipping, AdamW. No Trainer,
so what it times is the model's forward and backward and the optimizer, not logging or
checkpoints.

Prints the seconds and tokens (each example whole, a shared prefix counted in every example
that starts with it; ``--share-prefix off`` packs every example whole, as a GPU does) of each
step and the tokens/s after the first two; with
``--profile`` the last step runs under torch.profiler and the table of operators by self CPU
time follows (``--shapes``: grouped by input shape, to tell a [T, 576] x [576, 1536] matmul
from a rank-16 one). Run it on a quiet machine, and compare two versions interleaved.

``--model-size`` trains a model of ``model_sizes.py`` instead (built once, random weights).
``135m-narrow`` is the 135M model's structure at width 72: its tokens/s is what the 135M step
could reach if every operation whose cost grows with the width (the matmuls, the elementwise
passes over activations) cost nothing. On a CPU whose matmuls are fast (AMX), that is the
part of the step that remains.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_seed_chat.jsonl"
DTYPE_KEY = {"none": "dtype", "bnb-4bit": "compute_dtype", "bnb-8bit": "compute_dtype"}

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
{dtype_key} = "{dtype}"
[peft]
plugin = "lora"
r = 16
alpha = 32
dropout = 0.05
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
[train]
max_length = 2048
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options that choose the model, data and step (shared with ``step_ablation.py``)."""
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--quant", default="none", choices=list(DTYPE_KEY))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4, help="examples a micro-batch (default 4)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument(
        "--share-prefix",
        choices=["on", "off"],
        default="on",
        help="each row's common prefix once (lorakit.prefix_sharing), as a CPU run does",
    )
    p.add_argument(
        "--model-path",
        type=Path,
        help="a local model folder, e.g. one bench_train --model-size built (default: embedded)",
    )
    p.add_argument(
        "--model-size",
        help="a model of model_sizes.py instead of --model-path: 360m, 1.7b, 135m-narrow, ...",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(p)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--shapes", action="store_true")
    p.add_argument("--rows", type=int, default=40, help="operator rows in the profile table")
    args = p.parse_args()

    import torch
    from lorakit.attention import packed_attention
    from lorakit.loss import supervised_nll

    run = setup(args)
    model, rows, order, params, opt = run.model, run.rows, run.order, run.params, run.opt
    times, tokens, faults = [], [], []
    profiler = None
    with packed_attention(model, "cpu"):
        for step in range(args.steps):
            chosen = [rows[i] for i in order[step * args.batch : (step + 1) * args.batch]]
            batch = run.batch(chosen)
            if args.profile and step == args.steps - 1:
                from torch.profiler import ProfilerActivity, profile

                profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes)
                profiler.__enter__()
            started = time.perf_counter()
            faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            nll, n = supervised_nll(model, batch)
            (nll / max(n, 1)).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted)
            tokens.append(sum(len(r.input_ids) for r in chosen))  # each example whole
            if profiler is not None:
                profiler.__exit__(None, None, None)
    print(
        f"{args.quant}, compute {args.dtype}, {run.threads} threads,"
        f" share prefix {args.share_prefix}"
    )
    print("step s:", " ".join(f"{t:.3f}" for t in times))
    print("tokens:", " ".join(str(t) for t in tokens))
    # a step that needs more memory than every step before it touches fresh pages (~2 us each
    # on a VM: 128k of them added 0.3 s to a 926-token step); its profile overstates what
    # writes to new buffers (conversions, copies), so profile a step without them
    print("minor page faults:", " ".join(str(f) for f in faults))
    if len(times) > 2:
        print(f"tokens/s after 2 steps: {sum(tokens[2:]) / sum(times[2:]):.1f}")
    if profiler is not None:
        table = profiler.key_averages(group_by_input_shape=args.shapes).table(
            sort_by="self_cpu_time_total",
            row_limit=args.rows,
            max_name_column_width=40,
        )
        print(table)


def setup(args: argparse.Namespace) -> argparse.Namespace:
    """The model as ``lorakit run`` builds it for training, the tokenized rows, a seeded order,
    the optimizer, and ``batch(examples)``: a packed row as the step sees it."""
    import torch

    if args.model_size:
        import model_sizes

        if args.model_path or args.model_size not in model_sizes.SHAPES:
            raise SystemExit(
                f"--model-size {args.model_size}: expected one of {', '.join(model_sizes.SHAPES)}"
                ", and no --model-path"
            )
        args.model_path = model_sizes.model_folder(args.model_size, REPO / "benchmarks" / "results")
    from lorakit.catalog import default_catalog
    from lorakit.components import build_components
    from lorakit.data.pipeline import DataReport, load_splits, tokenize_examples
    from lorakit.device import configure_malloc, configure_threads
    from lorakit.fast_dropout import use_fast_dropout
    from lorakit.fused_lora import use_fused_lora
    from lorakit.fused_norm import use_fused_norm
    from lorakit.modeling import attach_new_adapter, load_base_model, load_tokenizer, resolve_model
    from lorakit.packing import pack
    from lorakit.prefix_sharing import share_row_prefix
    from lorakit.recipe import load_recipe

    recipe_path = Path(tempfile.mkdtemp()) / "profile.toml"
    recipe_path.write_text(
        RECIPE.format(
            data=args.data.resolve(),
            model=f'plugin = "local"\npath = "{args.model_path.resolve()}"'
            if args.model_path
            else 'plugin = "smollm2-135m-instruct"',
            quant=args.quant,
            dtype_key=DTYPE_KEY[args.quant],
            dtype=args.dtype,
        )
    )
    threads = configure_threads()
    configure_malloc()  # as `lorakit run` does on CPU (LORAKIT_MALLOC)
    catalog = default_catalog()
    recipe = load_recipe(recipe_path, catalog=catalog)
    parts = build_components(recipe, catalog)
    ref = resolve_model(parts.model_source)
    tok = load_tokenizer(ref)
    splits = load_splits(parts.sources, recipe.data, recipe.recipe_dir, DataReport())
    rows = tokenize_examples(splits.train, parts.formatter, tok, 2048, "drop", DataReport())
    model = parts.quant.prepare_for_training(load_base_model(ref, parts.quant, "cpu"), False)
    model = attach_new_adapter(model, parts.peft, 42)
    use_fast_dropout(model)
    use_fused_lora(model)
    use_fused_norm(model)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()

    def batch(chosen: list) -> dict:
        row = pack([{"input_ids": r.input_ids, "labels": r.labels} for r in chosen])
        return share_row_prefix(row) if args.share_prefix == "on" else row

    return argparse.Namespace(
        model=model, rows=rows, order=order, params=params, opt=opt, threads=threads, batch=batch
    )


if __name__ == "__main__":
    main()
