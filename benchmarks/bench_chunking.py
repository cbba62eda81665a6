"""Benchmark markdown chunking: a 10 MB markdown folder through ``lorakit check``.

    .venv/bin/python benchmarks/bench_chunking.py [--mb 10] [--small-kb 200] [--max-length 256]

Writes ``--mb`` MB of markdown (1 MB files of headings and paragraphs) and times
``lorakit check --tokenizer FOLDER`` on it in a subprocess, as a user runs it. Then, on one
``--small-kb`` document, times the chunker against the algorithm it replaced (bisecting over the
whole rest of the document for every chunk: quadratic) in the same process and prints the ratio.
Uses the embedded SmolLM2 tokenizer when its converted cache exists (run any recipe once), else
the small BPE tokenizer the tests train. Timings need a quiet machine.
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "the",
    "model",
    "reads",
    "a",
    "document",
    "and",
    "learns",
    "how",
    "its",
    "sentences",
    "continue",
    "while",
    "the",
    "trainer",
    "counts",
    "tokens",
    "per",
    "step",
    "so",
    "that",
    "every",
    "chunk",
    "fits",
    "the",
    "budget",
    "of",
    "one",
    "row",
]


def markdown(rng: random.Random, size: int) -> str:
    parts: list[str] = []
    n = 0
    while n < size:
        level = "#" * rng.randint(1, 3)
        block = [f"{level} {' '.join(rng.choices(WORDS, k=4)).title()}\n"]
        for _ in range(rng.randint(1, 4)):
            sentences = [
                " ".join(rng.choices(WORDS, k=rng.randint(6, 18))).capitalize() + "."
                for _ in range(rng.randint(2, 6))
            ]
            block.append(" ".join(sentences) + "\n")
        text = "\n".join(block) + "\n"
        parts.append(text)
        n += len(text)
    return "".join(parts)


def tokenizer_folder(tmp: Path) -> tuple[Path, str]:
    from lorakit_plugins.models.smollm2 import COMPLETE, cache_root

    folder = cache_root() / "smollm2-135m-instruct"
    if (folder / COMPLETE).is_file():
        return folder, "SmolLM2 (embedded cache)"
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import build_data_tokenizer as build_tokenizer

    out = tmp / "tokenizer"
    build_tokenizer().save_pretrained(str(out))
    return out, "test BPE tokenizer"


# The chunker before issue 13 item 8, kept here as the reference the ratio is measured against.
_LEVELS = (
    re.compile(r"\n(?=#{1,6}\s)"),
    re.compile(r"\n[ \t]*\n"),
    re.compile(r"\n"),
    re.compile(r"[.!?]\s"),
    re.compile(r"\s"),
)


def quadratic_chunk_text(text: str, fits: Callable[[str], bool]) -> list[str]:
    pieces: list[str] = []
    start, n = 0, len(text)
    while start < n:
        if fits(text[start:]):
            pieces.append(text[start:])
            break
        lo, hi = start, n
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(text[start:mid]):
                lo = mid
            else:
                hi = mid
        if lo == start:
            raise ValueError(f"a single character at offset {start} does not fit")
        end = lo
        for level in _LEVELS:
            cuts = [m.end() for m in level.finditer(text, start, lo) if start < m.end() <= lo]
            good = [c for c in reversed(cuts) if c - start >= 0.5 * (lo - start)]
            found = next((c for c in good if fits(text[start:c])), None)
            if found is not None:
                end = found
                break
        pieces.append(text[start:end])
        start = end
    return pieces


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=10.0, help="markdown folder size for check")
    parser.add_argument("--small-kb", type=int, default=200, help="document size for the ratio")
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()

    from lorakit.contracts import Example
    from lorakit.data.chunking import chunk_text
    from lorakit.data.lite_tokenizer import LiteTokenizer
    from lorakit.data.pipeline import _fits, _token_ends
    from lorakit_plugins.formatters.raw_text import RawTextFormatter, RawTextOptions

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder, which = tokenizer_folder(tmp)
        print(f"tokenizer: {which}; train.max_length {args.max_length}")

        # 1. The whole `check` on a big folder, in a subprocess.
        docs = tmp / "docs"
        docs.mkdir()
        total = 0
        for i in range(max(1, round(args.mb))):
            text = markdown(rng, int(args.mb * 1e6 / max(1, round(args.mb))))
            (docs / f"doc{i:03d}.md").write_text(text, encoding="utf-8")
            total += len(text.encode())
        recipe = tmp / "recipe.toml"
        recipe.write_text(
            '[model]\nplugin = "smollm2-135m-instruct"\n'
            "[data]\nval_fraction = 0.0\ntest_fraction = 0.0\n"
            '[[data.sources]]\nplugin = "markdown"\npath = "docs"\n'
            '[format]\nplugin = "raw_text"\n'
            f"[train]\nmax_length = {args.max_length}\n"
            f'[output]\ndir = "{tmp / "runs"}"\n',
            encoding="utf-8",
        )
        lorakit = Path(sys.executable).with_name("lorakit")
        t0 = time.perf_counter()
        done = subprocess.run(
            [str(lorakit), "check", str(recipe), "--tokenizer", str(folder)],
            capture_output=True,
            text=True,
        )
        elapsed = time.perf_counter() - t0
        if done.returncode != 0:
            sys.exit(f"check failed:\n{done.stdout}\n{done.stderr}")
        chunked = next((ln for ln in done.stdout.splitlines() if "chunk" in ln), "")
        print(f"check on {total / 1e6:.1f} MB of markdown: {elapsed:.1f} s ({chunked.strip()})")

        # 2. Linear vs the old quadratic chunker on one smaller document, same process.
        tokenizer = LiteTokenizer(folder)
        text = markdown(rng, args.small_kb * 1000)
        doc = Example(id="d", text=text, meta={"chunkable": True})
        fits = _fits(RawTextFormatter(RawTextOptions()), tokenizer, args.max_length, doc)
        t0 = time.perf_counter()
        new = chunk_text(text, fits, _token_ends(text, tokenizer))
        t_new = time.perf_counter() - t0
        t0 = time.perf_counter()
        old = quadratic_chunk_text(text, fits)
        t_old = time.perf_counter() - t0
        print(
            f"chunking one {len(text) / 1e3:.0f} kB document into {len(new)} chunks: "
            f"{t_new:.2f} s, the old algorithm {t_old:.2f} s: {t_old / t_new:.0f}x faster; "
            f"same chunks: {new == old}"
        )


if __name__ == "__main__":
    main()
