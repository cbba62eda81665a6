"""What KTO's KL estimate adds to a step: the mismatched rows' two forwards without gradients
(the model's and the reference's) against the answers' forward and backward.

    .venv/bin/python benchmarks/bench_kto_step.py [--quant bnb-4bit|none] [--dtype bf16|fp32]
        [--steps 8] [--pairs examples/demo_task/data/pairs.jsonl]

Builds the embedded SmolLM2-135M-Instruct with a fresh LoRA adapter (r=16) as ``lorakit run``
does (quant backend, compute dtype, fast dropout, fused LoRA layers, packed attention), reads
the demo's preference pairs as KTO answers (each pair: a desirable and an undesirable answer)
and, for micro-batches of 8 answers in a seeded order, measures the CPU seconds of

- ``step``: the answers' forward (logits at answer positions only) and backward;
- ``kl``: :func:`lorakit.kto.mismatched_logps`, the mismatched rows scored by the model and
  by the reference (the adapter's starting weights set back), without gradients, in eval mode.

Prints each micro-batch's numbers and the median ratio ``kl / step``. CPU seconds on a machine
shared with other work still include threads spinning while they wait: compare medians, run it
with ``--threads 1`` on a loaded machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PAIRS = REPO / "examples" / "demo_task" / "data" / "pairs.jsonl"
DTYPE_KEY = {"none": "dtype", "bnb-4bit": "compute_dtype"}

RECIPE = """
[model]
plugin = "smollm2-135m-instruct"
[[data.sources]]
plugin = "preference_jsonl"
path = "{pairs}"
[data]
val_fraction = 0.0
test_fraction = 0.0
[quant]
plugin = "{quant}"
{dtype_key} = "{dtype}"
[peft]
r = 16
alpha = 32
dropout = 0.05
[train]
objective = "kto"
max_length = 192
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quant", default="bnb-4bit", choices=list(DTYPE_KEY))
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS)
    args = p.parse_args()

    import torch
    from lorakit.attention import packed_attention
    from lorakit.catalog import default_catalog
    from lorakit.components import build_components
    from lorakit.data.pipeline import DataReport, load_splits
    from lorakit.data.unpaired import tokenize_answers
    from lorakit.device import configure_threads
    from lorakit.fast_dropout import use_fast_dropout
    from lorakit.fused_lora import use_fused_lora
    from lorakit.kto import AnswerDataset, StartWeights, mismatched_logps, pack_answers
    from lorakit.loss import accepts_logits_to_keep
    from lorakit.modeling import attach_new_adapter, load_base_model, load_tokenizer, resolve_model
    from lorakit.preference import sequence_logps
    from lorakit.recipe import load_recipe

    if not args.pairs.is_file():
        raise SystemExit(f"{args.pairs}: run examples/demo_task/make_pairs.py first")
    recipe_path = Path(tempfile.mkdtemp()) / "kto.toml"
    recipe_path.write_text(
        RECIPE.format(
            pairs=args.pairs.resolve(),
            quant=args.quant,
            dtype_key=DTYPE_KEY[args.quant],
            dtype=args.dtype,
        )
    )
    threads = configure_threads(args.threads)
    catalog = default_catalog()
    recipe = load_recipe(recipe_path, catalog=catalog)
    parts = build_components(recipe, catalog)
    ref = resolve_model(parts.model_source)
    tok = load_tokenizer(ref)
    splits = load_splits(parts.sources, recipe.data, recipe.recipe_dir, DataReport())
    rows = tokenize_answers(splits.train, parts.formatter, tok, 192, "drop", DataReport())
    model = parts.quant.prepare_for_training(load_base_model(ref, parts.quant, "cpu"), False)
    model = attach_new_adapter(model, parts.peft, 42)
    use_fast_dropout(model)
    use_fused_lora(model)
    model.train()
    head = accepts_logits_to_keep(model)
    start = StartWeights(model)
    data = AnswerDataset(rows, [0.0] * len(rows))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    steps, kls, tokens = [], [], []
    with packed_attention(model, "cpu"):
        for s in range(args.steps):
            batch = pack_answers([data[i] for i in order[s * 8 : (s + 1) * 8]])
            started = time.process_time()
            logps, _ = sequence_logps(model, batch, head)
            logps.sum().backward()
            steps.append(time.process_time() - started)
            started = time.process_time()
            mismatched_logps(model, batch["kl"], head, start)
            kls.append(time.process_time() - started)
            tokens.append((batch["input_ids"].numel(), batch["kl"]["input_ids"].numel()))
            print(
                f"batch {s}: step {steps[-1]:.2f} CPU s ({tokens[-1][0]} tokens), "
                f"kl {kls[-1]:.2f} CPU s ({tokens[-1][1]} tokens)",
                flush=True,
            )
    ratios = [k / s for k, s in zip(kls, steps, strict=True)]
    print(f"{args.quant}, compute {args.dtype}, {threads} threads, {len(rows)} answers")
    print(
        f"median step {statistics.median(steps):.2f} CPU s, median kl "
        f"{statistics.median(kls):.2f} CPU s, median kl/step {statistics.median(ratios):.2f}"
    )


if __name__ == "__main__":
    main()
