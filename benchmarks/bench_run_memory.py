"""Peak memory of a whole `lorakit run`, phase by phase, for one or more copies of the code.

Runs ``lorakit run RECIPE`` (short by default: 6 steps, 16 eval examples) once per ``--code``
folder (a lorakit checkout: its ``core`` and ``plugins`` go first on PYTHONPATH), alternating
them ``--repeat`` times, and samples the process's resident memory every 50 ms. The run's own
lines mark the phases:

    data   from the start to "loading ..."           (read, split, tokenize; CLI imports)
    load   to the first "step 1/..."                  (base model, quantization, adapter)
    train  to "adapter saved"                         (the steps and val-loss checks)
    eval   to the end                                 (base and tuned scoring, reports)

and the peak of the whole process comes from ``wait4`` (the kernel's count, not the sampling).
Memory does not depend on a quiet machine the way time does, so contenders may share it.

    python benchmarks/bench_run_memory.py --code /path/to/old/checkout --code .
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = (("load", "loading "), ("train", "step 1/"), ("eval", "adapter saved"))
ENTRY = "import sys; from lorakit.cli.main import main; sys.argv[0] = 'lorakit'; sys.exit(main())"


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def measure(code: Path, recipe: Path, overrides: list[str], out_dir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{code / 'core'}:{code / 'plugins'}")
    args = [sys.executable, "-c", ENTRY, "run", str(recipe), *overrides]
    args += [f"output.dir={out_dir}", "output.name=mem"]
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    phase = ["data"]
    peaks: dict[str, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            mb = rss_mb(proc.pid)
            if mb is not None:
                peaks[phase[0]] = max(peaks.get(phase[0], 0.0), mb)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    assert proc.stderr is not None
    upcoming = list(PHASES)  # the phases advance in order, each at its first marker
    for raw in proc.stderr:
        line = raw.decode(errors="replace")
        lines.append(line)
        while upcoming and upcoming[0][1] in line:
            phase[0] = upcoming.pop(0)[0]
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    if status != 0:
        sys.exit(f"lorakit run failed with {code}:\n" + "".join(lines[-20:]))
    return {"phases": peaks, "peak": usage.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", action="append", type=Path, help="a lorakit checkout (repeatable)")
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "smollm2_qlora.toml")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument(
        "overrides",
        nargs="*",
        default=[
            "train.max_steps=6",
            "train.eval_steps=3",
            "train.save_steps=6",
            "eval.max_examples=16",
        ],
    )
    args = ap.parse_args()
    codes = args.code or [REPO]
    results: dict[Path, list[dict]] = {c: [] for c in codes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            for i, code in enumerate(codes):  # alternating: a drift hits every copy alike
                results[code].append(
                    measure(code, args.recipe, args.overrides, Path(tmp) / f"{r}-{i}")
                )
    print(f"recipe {args.recipe.name} {' '.join(args.overrides)}; peak RSS in MB (max of runs)")
    print(f"{'code':40} {'data':>7} {'load':>7} {'train':>7} {'eval':>7} {'peak':>7}")
    for code, runs in results.items():
        cols = [
            max(r["phases"].get(p, 0.0) for r in runs) for p in ("data", "load", "train", "eval")
        ]
        peak = max(r["peak"] for r in runs)
        print(f"{str(code)[-40:]:40} " + " ".join(f"{c:7.0f}" for c in [*cols, peak]))
    if len(codes) == 2:
        ra, rb = results.values()
        ea = max(r["phases"].get("eval", 0.0) for r in ra)
        eb = max(r["phases"].get("eval", 0.0) for r in rb)
        pa, pb = max(r["peak"] for r in ra), max(r["peak"] for r in rb)
        print(f"eval phase: {eb / ea:.2f}x of the first; whole run peak: {pb / pa:.2f}x")


if __name__ == "__main__":
    main()
