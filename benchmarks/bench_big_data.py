"""Benchmark big data sets: peak memory and time of ``lorakit check`` and ``prepare``.

    .venv/bin/python benchmarks/bench_big_data.py [--mb 5,20,50] [--markdown-mb 1,2,5,10]
        [--baseline CHECKOUT] [--out FILE]

Writes N MB of chat JSONL (``chat_jsonl`` records: an optional system turn, one or two
user/assistant exchanges of varying length, unique ids) into a temporary folder, with a recipe
for the embedded SmolLM2 (its chat template and tokenizer, so ``check`` computes token
statistics), and runs ``lorakit check`` and ``lorakit prepare`` on it, each in a subprocess of
its own. For each size it prints the peak RSS (``wait4``'s ``ru_maxrss`` of that process alone),
the wall seconds and the CPU seconds (user + sys of that process, from ``wait4``: less
sensitive to other processes on the machine than wall time) per MB, then the ratio
time(2N)/time(N) for each pair of sizes where one is twice the other (about 2 means linear
time) and, for every size against the smallest, the ratio of CPU seconds per MB (about 1 means
linear time). ``--rss-limit-mb`` makes a size whose peak RSS passes it a failure (exit 1). ``--markdown-mb`` times ``check`` on folders of markdown of
those sizes (1 MB documents chunked to ``train.max_length`` 256), with the same ratios.
``--baseline CHECKOUT`` runs each markdown ``check`` with that checkout's code too, right before
this one's (interleaved, so both see the same load), and prints the time ratio.

The token statistics need the embedded model's converted cache (~/.cache/lorakit; run any
recipe once); without it ``check`` skips them and the output says so. Timings are only
comparable within one run of this script on one machine; memory numbers are steadier.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAIN = "import sys; from lorakit.cli.main import main; sys.exit(main(sys.argv[1:]))"
WORDS = [
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
    "three",
    "customer",
    "order",
    "shipping",
    "price",
    "size",
    "small",
    "large",
    "medium",
    "return",
    "policy",
    "week",
    "month",
    "please",
    "thanks",
    "because",
    "while",
    "after",
    "before",
    "every",
    "some",
    "many",
    "few",
    "table",
    "chair",
    "lamp",
    "shirt",
    "jacket",
    "shoe",
    "boot",
    "sock",
    "hat",
    "scarf",
    "glove",
    "budget",
    "under",
    "over",
    "about",
    "near",
    "far",
]


def _sentences(rng: random.Random, n: int) -> list[str]:
    return [
        " ".join(rng.choices(WORDS, k=rng.randint(4, 30))).capitalize()
        + rng.choice([".", "?", "!"])
        for _ in range(n)
    ]


def write_chat(path: Path, mb: float, seed: int = 0) -> int:
    """About ``mb`` MB of chat JSONL; returns the number of records. Each turn is a few
    sentences from a pool plus a random number, so conversations are (almost all) distinct."""
    rng = random.Random(seed)
    pool = _sentences(rng, 5000)
    target = int(mb * 1e6)
    written = n = 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            msgs = []
            if n % 3 == 0:
                msgs.append({"role": "system", "content": "You are a concise assistant."})
            for _ in range(1 + (n % 4 == 0)):
                q = " ".join(rng.choices(pool, k=rng.randint(1, 3)))
                a = " ".join(rng.choices(pool, k=rng.randint(1, 6)))
                msgs.append({"role": "user", "content": f"{q} #{rng.randrange(10**6)}"})
                msgs.append({"role": "assistant", "content": a})
            meta = {"tags": ["bench"]} if n % 5 == 0 else {}
            line = json.dumps({"id": f"r{n}", "messages": msgs, "meta": meta}) + "\n"
            f.write(line)
            written += len(line)
            n += 1
    return n


def write_markdown(folder: Path, mb: float, seed: int = 0) -> None:
    """``mb`` MB of markdown in 1 MB documents of headings and paragraphs."""
    rng = random.Random(seed)
    pool = _sentences(rng, 2000)
    folder.mkdir()
    files = max(1, round(mb))
    for i in range(files):
        parts, size = [], 0
        while size < mb * 1e6 / files:
            block = f"{'#' * rng.randint(1, 3)} {rng.choice(pool)}\n\n"
            block += "\n\n".join(
                " ".join(rng.choices(pool, k=rng.randint(2, 6))) for _ in range(rng.randint(1, 4))
            )
            block += "\n\n"
            parts.append(block)
            size += len(block)
        (folder / f"doc{i:03d}.md").write_text("".join(parts), encoding="utf-8")


def recipe(folder: Path, source: str, fmt: str, max_length: int, fractions: str) -> Path:
    path = folder / "bench.toml"
    path.write_text(
        '[model]\nplugin = "smollm2-135m-instruct"\n'
        f"[data]\n{fractions}\n"
        f"[[data.sources]]\n{source}\n"
        f'[format]\nplugin = "{fmt}"\n'
        f"[train]\nmax_length = {max_length}\n"
        f'[output]\ndir = "{folder / "runs"}"\n',
        encoding="utf-8",
    )
    return path


def code_env(repo: Path) -> dict[str, str]:
    """The environment that runs ``repo``'s lorakit."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(repo / "core"), str(repo / "plugins"), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["TQDM_DISABLE"] = "1"
    return env


def markdown_runs(tmp: Path, sizes: list[float], baseline: Path | None) -> list[dict]:
    """``check`` on each markdown size, the baseline's code first when given."""
    rows: list[dict] = []
    codes = ([("baseline", baseline)] if baseline else []) + [("this", REPO)]
    for mb in sizes:
        folder = tmp / f"markdown{mb:g}"
        folder.mkdir()
        write_markdown(folder / "docs", mb)
        path = recipe(
            folder,
            'plugin = "markdown"\npath = "docs"',
            "raw_text",
            256,
            "val_fraction = 0.0\ntest_fraction = 0.0",
        )
        row: dict = {"kind": "markdown", "mb": mb}
        for name, repo in codes:
            rss, secs, _, out = measure(["check", str(path)], code_env(repo))
            chunked = next((ln.strip() for ln in out.splitlines() if "chunk" in ln), "")
            row[name] = {"peak_rss_mb": round(rss), "seconds": round(secs, 2), "out": chunked}
            print(
                f"markdown {mb:5g} MB check ({name:8s}): peak RSS {rss:5.0f} MB, {secs:6.1f} s"
                f" ({chunked})",
                flush=True,
            )
        if baseline:
            same = row["baseline"]["out"] == row["this"]["out"]
            print(
                f"markdown {mb:g} MB: time baseline/this = "
                f"{row['baseline']['seconds'] / row['this']['seconds']:.2f}"
                f" (same chunk count: {same})"
            )
        rows.append(row)
        subprocess.run(["rm", "-rf", str(folder)], check=False)
    for name, _ in codes:
        for r in rows:
            double = next((d for d in rows if abs(d["mb"] - 2 * r["mb"]) < 0.05 * d["mb"]), None)
            if double is not None:
                print(
                    f"markdown check ({name}): time({double['mb']:g} MB)/time({r['mb']:g} MB) = "
                    f"{double[name]['seconds'] / r[name]['seconds']:.2f} (2.00: linear)"
                )
    return rows


def measure(args: list[str], env: dict[str, str]) -> tuple[float, float, float, str]:
    """(peak RSS in MB, wall seconds, CPU seconds (user + sys), output) of one ``lorakit ...``
    process (this checkout's code)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", MAIN, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"lorakit {' '.join(args)} failed ({proc.returncode}):\n{out[-3000:]}")
    return usage.ru_maxrss / 1024, elapsed, usage.ru_utime + usage.ru_stime, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", default="5,20,50", help="comma-separated chat JSONL sizes (MB)")
    parser.add_argument("--markdown-mb", default="10", help="comma-separated sizes; 0: none")
    parser.add_argument("--baseline", type=Path, help="another checkout to time markdown against")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", help="also write the results as JSON to this file")
    parser.add_argument(
        "--rss-limit-mb", type=float, default=0, help="fail when a peak RSS passes this (0: none)"
    )
    args = parser.parse_args()
    sizes = [float(s) for s in args.mb.split(",") if s]
    env = code_env(REPO)
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs, load {load:.1f}; python {sys.version.split()[0]}; {REPO}")
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lorakit-bigdata-") as tmp_name:
        tmp = Path(tmp_name)
        for mb in sizes:
            folder = tmp / f"chat{mb:g}"
            folder.mkdir()
            n = write_chat(folder / "chat.jsonl", mb)
            size = (folder / "chat.jsonl").stat().st_size / 1e6
            path = recipe(
                folder,
                'plugin = "chat_jsonl"\npath = "chat.jsonl"',
                "chat_template",
                args.max_length,
                "val_fraction = 0.05\ntest_fraction = 0.05",
            )
            row: dict = {"kind": "chat_jsonl", "mb": round(size, 1), "records": n}
            for verb in ("check", "prepare"):
                rss, secs, cpu, out = measure([verb, str(path)], env)
                row[verb] = {
                    "peak_rss_mb": round(rss),
                    "seconds": round(secs, 2),
                    "cpu_seconds": round(cpu, 2),
                    "cpu_s_per_mb": round(cpu / size, 4),
                }
                if verb == "check" and "token statistics skipped" in out:
                    row["note"] = "no tokenizer cache: check skipped token statistics"
                print(
                    f"chat_jsonl {size:7.1f} MB ({n:>8} records) {verb:8s} peak RSS "
                    f"{rss:7.0f} MB ({rss / size:5.2f}x file)  {secs:7.1f} s, "
                    f"CPU {cpu:7.1f} s ({cpu / size:.3f} s/MB)",
                    flush=True,
                )
            results.append(row)
            for p in folder.glob("chat.jsonl"):
                p.unlink()  # keep the temporary disk use to about the largest size
            subprocess.run(["rm", "-rf", str(folder / "runs")], check=False)
        by_mb = {r["mb"]: r for r in results}
        for r in results:
            double = next((d for m, d in by_mb.items() if abs(m - 2 * r["mb"]) < 0.05 * m), None)
            if double is None:
                continue
            for verb in ("check", "prepare"):
                ratio = double[verb]["seconds"] / r[verb]["seconds"]
                mem = double[verb]["peak_rss_mb"] / r[verb]["peak_rss_mb"]
                print(
                    f"{verb}: time({double['mb']:g} MB)/time({r['mb']:g} MB) = {ratio:.2f}, "
                    f"peak RSS ratio {mem:.2f} (2.00: linear time; memory should stay flat)"
                )
        for r in results[1:]:
            first = results[0]
            for verb in ("check", "prepare"):
                ratio = r[verb]["cpu_s_per_mb"] / first[verb]["cpu_s_per_mb"]
                print(
                    f"{verb}: CPU s/MB at {r['mb']:g} MB / at {first['mb']:g} MB = {ratio:.2f} "
                    f"({r[verb]['cpu_s_per_mb']:.3f} / {first[verb]['cpu_s_per_mb']:.3f}; "
                    "1.00: linear time)"
                )
        over = [
            f"{verb} at {r['mb']:g} MB: {r[verb]['peak_rss_mb']} MB"
            for r in results
            for verb in ("check", "prepare")
            if args.rss_limit_mb and r[verb]["peak_rss_mb"] > args.rss_limit_mb
        ]
        if args.rss_limit_mb:
            print(f"peak RSS limit {args.rss_limit_mb:g} MB: " + ("; ".join(over) or "held"))
        md_sizes = [float(m) for m in args.markdown_mb.split(",") if m and float(m) > 0]
        results += markdown_runs(tmp, md_sizes, args.baseline)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if over:
        sys.exit(1)


if __name__ == "__main__":
    main()
