"""Benchmark the data path: validate, split and tokenize 100k chat examples.

    .venv/bin/python benchmarks/bench_data.py [--n 100000] [--format chat_template]

Uses the embedded SmolLM2 tokenizer from the converted cache when it exists (run any recipe
once), else the small BPE tokenizer the tests train. Prints each phase's time; the target is
under 60 s in total on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_data(path: Path, n: int) -> None:
    rng = random.Random(0)
    words = [
        "the",
        "a",
        "report",
        "model",
        "data",
        "train",
        "answer",
        "question",
        "value",
        "red",
        "blue",
        "green",
        "one",
        "two",
    ]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            msgs = []
            if i % 3 == 0:
                msgs.append({"role": "system", "content": "You are a concise assistant."})
            for _ in range(1 + (i % 4 == 0)):
                q = " ".join(rng.choices(words, k=rng.randint(5, 25)))
                a = " ".join(rng.choices(words, k=rng.randint(5, 40)))
                msgs += [
                    {"role": "user", "content": q + "?"},
                    {"role": "assistant", "content": a + "."},
                ]
            f.write(
                json.dumps({"id": f"ex{i}", "messages": msgs, "meta": {"tags": ["bench"]}}) + "\n"
            )


def load_tokenizer():
    from lorakit_plugins.models.smollm2 import COMPLETE, cache_root

    folder = cache_root() / "smollm2-135m-instruct"
    if (folder / COMPLETE).is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder)), "SmolLM2 (embedded cache)"
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import build_data_tokenizer as build_tokenizer

    return build_tokenizer(), "test BPE tokenizer"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--format", default="chat_template")
    args = parser.parse_args()

    from lorakit.catalog import default_catalog
    from lorakit.components import build_components
    from lorakit.data.pipeline import DataReport, load_splits, tokenize_examples
    from lorakit.recipe import load_recipe

    tokenizer, tok_name = load_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_data(folder / "chat.jsonl", args.n)
        recipe_path = folder / "bench.toml"
        recipe_path.write_text(
            f'[[data.sources]]\nplugin = "chat_jsonl"\npath = "chat.jsonl"\n'
            f'[format]\nplugin = "{args.format}"\n[train]\nmax_length = 512\n'
        )
        catalog = default_catalog()
        recipe = load_recipe(recipe_path, (), catalog)
        components = build_components(recipe, catalog)
        formatter = components.formatter

        t0 = time.perf_counter()
        report = DataReport()
        splits = load_splits(components.sources, recipe.data, recipe.recipe_dir, report)
        t1 = time.perf_counter()
        rows = []
        for name in ("train", "val", "test"):
            rows += tokenize_examples(splits.get(name), formatter, tokenizer, 512, "drop", report)
        t2 = time.perf_counter()

    tokens = sum(len(r.input_ids) for r in rows)
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"tokenizer: {tok_name}; format: {args.format}; {os.cpu_count()} CPUs, load {load:.1f}")
    print(f"read + validate + split {args.n} examples: {t1 - t0:6.2f} s")
    print(f"render + tokenize + label ({tokens:,} tokens): {t2 - t1:6.2f} s")
    total = t2 - t0
    print(
        f"total: {total:.2f} s ({args.n / total:,.0f} examples/s) -> {'OK' if total < 60 else 'SLOW'} (target < 60 s)"
    )


if __name__ == "__main__":
    main()
