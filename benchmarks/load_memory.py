"""Memory and time of a 4-bit model load on CPU: before and after ``device.loading_memory`` and
``quantize_cpu``'s chunked quantization.

    PYTHONPATH=core:plugins .venv/bin/python benchmarks/load_memory.py [--rounds 3]
        [--model-size 1.7b|7b | --model-path DIR] [--quant bnb-4bit|bnb-8bit]
        [--variants heap,loading_memory,chunked]

Each load runs in its own process, the variants alternated for ``--rounds`` rounds, all under
``LORAKIT_MALLOC=keep`` as ``lorakit run`` sets it on CPU: ``heap`` loads with keep's thresholds
and bitsandbytes' quantization kernel (lorakit before both changes), ``loading_memory`` with
``device.loading_memory`` around the load and bitsandbytes' kernel, ``chunked`` as
``load_base_model`` loads now (that block and ``quantize_cpu.quantize_4bit``). A thread samples
``/proc/self/status`` every 50 ms; printed per load: seconds, the peak of anonymous memory (what
the process holds; the mapped checkpoint's pages are file-backed, counted apart: the kernel can
drop them), the peak RSS (both; what ``ru_maxrss`` reports) and the anonymous memory left when
the load is done. The default model is SmolLM2-1.7B's shapes with random weights, as
``bench_train.py --model-size 1.7b`` builds it; ``--model-size 7b`` has Mistral-7B's layers
(a 14 GB folder, built once; ``heap`` may need more RAM than a 24 GB machine has).
``--quant bnb-8bit`` loads in 8-bit instead (bitsandbytes' own kernel in every variant: the
chunked one is 4-bit only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(model: str, quant: str, variant: str) -> None:
    sys.path[:0] = [str(REPO / "core"), str(REPO / "plugins")]
    from lorakit import device, modeling, quantize_cpu
    from lorakit.catalog import default_catalog
    from lorakit.contracts import ModelRef
    from lorakit.modeling import load_base_model

    os.environ["LORAKIT_MALLOC"] = "keep"
    device.configure_malloc()
    samples: list[dict[str, float]] = []
    done = threading.Event()

    def status() -> dict[str, float]:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("RssAnon", "RssFile")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) / 2**20
        return out

    def sample() -> None:
        while not done.is_set():
            samples.append(status())
            time.sleep(0.05)

    entry = default_catalog().get("quant", quant)
    backend = entry.factory(entry.options_class(compute_dtype="bf16"))
    if variant == "heap":  # lorakit before both changes
        modeling.cpu_loading = _no_block  # type: ignore[assignment]
    elif variant == "loading_memory":  # bitsandbytes' own quantization kernel
        quantize_cpu.chunked_4bit_quantization = _no_block  # type: ignore[assignment]
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    load_base_model(ModelRef(path=model), backend, "cpu")
    seconds = time.perf_counter() - started
    done.set()
    thread.join()
    end = status()
    print(
        json.dumps(
            {
                "variant": variant,
                "seconds": round(seconds, 1),
                "peak_anon_gb": round(max(s["RssAnon"] for s in samples), 2),
                "peak_rss_gb": round(max(s["RssAnon"] + s["RssFile"] for s in samples), 2),
                "end_anon_gb": round(end["RssAnon"], 2),
            }
        )
    )


def _no_block():  # type: ignore[no-untyped-def]
    import contextlib

    return contextlib.nullcontext()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-path", type=Path)
    p.add_argument("--model-size", default="1.7b", help="a random-weight shape of model_sizes.py")
    p.add_argument(
        "--variants", default="heap,loading_memory,chunked", help="comma-separated, in this order"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quant", default="bnb-4bit", choices=["bnb-4bit", "bnb-8bit"])
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.model_path:
        model = str(args.model_path.resolve())
    else:
        sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "core"), str(REPO / "plugins")]
        from model_sizes import model_folder

        model = str(model_folder(args.model_size, REPO / "benchmarks" / "results"))
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'core'}:{REPO / 'plugins'}")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants.split(",")}
    for r in range(args.rounds):
        for variant in results:
            out = subprocess.run(
                [sys.executable, __file__, "--child", model, args.quant, variant],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            record = json.loads(out.strip().splitlines()[-1])
            results[variant].append(record)
            print(f"round {r + 1} {variant}: {record}", flush=True)
    print(f"\n{args.quant} load of {model} on CPU, LORAKIT_MALLOC=keep, {args.rounds} rounds")
    print("| variant | load s | peak anonymous GB | peak RSS GB | anonymous GB after |")
    print("|---|---|---|---|---|")
    for variant, runs in results.items():
        cols = [
            ", ".join(str(r[k]) for r in runs)
            for k in ("seconds", "peak_anon_gb", "peak_rss_gb", "end_anon_gb")
        ]
        print(f"| {variant} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main()
