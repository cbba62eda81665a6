"""Device, dtype and thread choices, kept in one place (imports torch lazily).

CPUs differ a lot in bf16: with AVX512-BF16 or AMX a bf16 matmul runs about twice as fast as
fp32, without them PyTorch emulates it and it is 30-200x slower. ``auto`` therefore never guesses
from the CPU's name: it reads the CPU flags, and where they promise fast bf16 it times one short
matmul in both dtypes and keeps the faster. The answer is cached per CPU model and torch version
(``$LORAKIT_CACHE/cpu_dtype.json``), so the timing runs once per machine, not once per run.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_device(requested: str) -> str:
    import torch

    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            from lorakit.errors import RecipeError

            raise RecipeError(
                ['[train].device: "cuda" requested but no CUDA GPU is visible; use "auto" or "cpu"']
            )
        return requested
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def auto_compute_dtype(device: str) -> Any:
    """bf16 where the hardware runs it fast (capable GPUs, CPUs with measured fast bf16), else
    fp16 on older GPUs and fp32 on CPUs."""
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "cpu" and cpu_bf16_is_faster():
        return torch.bfloat16
    return torch.float32


DTYPES = ("fp32", "bf16", "fp16")  # the dtype names recipes and --dtype accept


def torch_dtype(name: str) -> Any:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` -> the torch dtype."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def dtype_name(dtype: Any) -> str:
    """The torch dtype -> ``"fp32"``, ``"bf16"`` or ``"fp16"`` (the names recipes use)."""
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def dtype_from_name(name: str, device: str) -> Any:
    """A dtype name or ``"auto"`` (the measured best compute dtype of ``device``)."""
    return auto_compute_dtype(device) if name == "auto" else torch_dtype(name)


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name with its family and model numbers (from ``cpuinfo``, default
    /proc/cpuinfo): VMs often show only a vendor line ("AMD EPYC" for Zen 4 and Zen 5 alike),
    and the numbers tell those apart."""
    fields: dict[str, str] = {}
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the end of the first processor's block
            continue
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", "unknown")
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']} model {fields['model']})"
    return name


def matmul_flops(dtype: Any, size: int = 1024, seconds: float = 0.3) -> float:
    """Measured matmul FLOP/s of ``dtype`` on this CPU with the current thread count."""
    import torch

    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up (allocations, kernel selection)
    n, start = 0, time.perf_counter()
    while True:
        a @ b
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * size**3 * n / elapsed


def _dtype_cache() -> Path:
    cache = Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))
    return cache / "cpu_dtype.json"


def _dtype_key(torch_version: str) -> str:
    return f"{_cpu_model()}|torch {torch_version}"


def _cached_dtype_rates() -> dict[str, Any]:
    try:
        known = json.loads(_dtype_cache().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def cached_bf16_choice(torch_version: str) -> bool | None:
    """What :func:`cpu_bf16_is_faster` decided on this CPU with this torch, from its cache
    alone (None: never timed); for callers that must not import torch."""
    try:
        return _bf16_wins(_cached_dtype_rates()[_dtype_key(torch_version)])
    except (KeyError, TypeError):
        return None  # never timed, or an entry that is not a timing


def _bf16_wins(rates: dict[str, float]) -> bool:
    return bool(rates["bf16_gflops"] > 1.1 * rates["fp32_gflops"])


def cpu_bf16_is_faster() -> bool:
    """True when this CPU has bf16 instructions and a timed bf16 matmul beats fp32."""
    if not any(flag in cpu_flags() for flag in BF16_FLAGS):
        return False
    import torch

    key = _dtype_key(torch.__version__)
    known = _cached_dtype_rates()
    if key not in known:
        fp32 = matmul_flops(torch.float32)
        bf16 = matmul_flops(torch.bfloat16)
        known[key] = {"fp32_gflops": round(fp32 / 1e9, 1), "bf16_gflops": round(bf16 / 1e9, 1)}
        path = _dtype_cache()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=2), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs the timing again next run
    return _bf16_wins(known[key])


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes of RAM available now (``MemAvailable``), or None where /proc/meminfo is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def configure_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads so the processes of this machine do not oversubscribe it.

    ``requested`` > 0 wins; else ``OMP_NUM_THREADS`` if the user set it; else the cores this
    process may run on, divided among the ranks that torchrun started on this node
    (``LOCAL_WORLD_SIZE``). Two processes that each spin 2 OpenMP threads on 2 cores run ~8x
    slower than one; the Rust tokenizer's own thread pool is turned off for the same reason.
    torchrun sets ``OMP_NUM_THREADS=1`` for its workers unless you set it yourself, so under
    torchrun a rank uses one thread unless ``OMP_NUM_THREADS`` or ``train.threads`` says more.
    """
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if requested > 0:
        n = requested
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit():
        n = int(os.environ["OMP_NUM_THREADS"])
    else:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        n = max(1, usable_cores() // max(1, per_node))
    n = max(1, n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


# Tensors at least this large get their own mmap from glibc and go back to the OS when freed.
MMAP_THRESHOLD = 128 * 1024
# LORAKIT_MALLOC=keep (the default on CPU): blocks up to this size come from the heap, and up to
# KEEP_TRIM_THRESHOLD of free memory at its top stays there for the next step
KEEP_MMAP_THRESHOLD = 256 * 2**20
KEEP_TRIM_THRESHOLD = 512 * 2**20
MALLOC_MODES = ("keep", "return", "glibc")
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers in glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_malloc_in_effect: str | None = None  # what configure_malloc set in this process
_loading_depth = 0


def malloc_mode() -> str:
    """``LORAKIT_MALLOC``: ``keep`` (unset or empty), ``return`` or ``glibc``; anything else is
    an error that names the three."""
    from lorakit.errors import RunError

    mode = os.environ.get("LORAKIT_MALLOC", "").strip().lower() or "keep"
    if mode not in MALLOC_MODES:
        raise RunError(
            f"LORAKIT_MALLOC={os.environ['LORAKIT_MALLOC']!r} is not a memory mode",
            fix="set it to keep (the default: fastest steps), return (peak RSS follows the live "
            "tensors, slower steps) or glibc (leave glibc's malloc as it is), or unset it",
        )
    return mode


def configure_malloc() -> str | None:
    """Set glibc's malloc for a CPU training run as ``LORAKIT_MALLOC`` says; return the mode
    that took effect, or None where nothing was changed (``glibc``, a ``MALLOC_*`` variable the
    user set, a C library that is not glibc).

    ``keep`` (the default): a training step allocates and frees the same large tensors every
    step (activations, the head's logits and probabilities: 33 MB for 170 answer tokens on a
    49k vocabulary). By default glibc gives a block above its mmap threshold (at most 32 MiB)
    its own mapping, unmapped when freed, and trims the heap's free top, so those tensors are
    fresh memory every step and each of their pages costs a page fault on first touch. With the
    thresholds raised they are reused from the heap: the fused head's forward and backward took
    54 against 37 ms for 170 positions, the 135M step about 2% less time
    (``docs/performance.md``), at a peak RSS about 2% higher. ``return``: :func:`return_freed_memory`.
    """
    global _malloc_in_effect
    mode = malloc_mode()
    took: str | None = None
    if mode == "return":
        took = mode if return_freed_memory() else None
    elif mode == "keep":
        took = mode if keep_freed_memory() else None
    _malloc_in_effect = took
    return took


def _glibc() -> Any:
    """glibc through ctypes, or None where the C library is not glibc or the user set one of
    glibc's own ``MALLOC_*`` variables (their settings win)."""
    if any(n in os.environ for n in _MALLOC_ENV):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both exist in glibc only
    except (OSError, AttributeError):
        return None
    return libc


def _mallopt() -> Any:
    libc = _glibc()
    return None if libc is None else libc.mallopt


def keep_freed_memory() -> bool:
    """glibc keeps freed blocks of up to 256 MiB on its heap for reuse (``LORAKIT_MALLOC=keep``,
    see :func:`configure_malloc`); True when it took effect."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(
        mallopt(_M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)
        and mallopt(_M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD)
    )


def return_freed_memory() -> bool:
    """Make glibc give freed tensor memory back to the OS at once; True when it took effect.

    By default glibc raises its mmap threshold to the size of the largest block freed so far
    (up to 32 MiB), so after the first freed activation every tensor below that size comes from
    the heap, and a training step's freed temporaries stay there as free-but-kept memory: in a
    measured step (``benchmarks/memory_stages.py``, SmolLM2-135M, 1458 packed tokens) 2.0 GB
    after the forward pass and 4.3 GB after backward, on top of 2.6 GB of live tensors, so peak
    RSS was 5.6 GB where the tensors never needed more than 3.6 GB. A fixed threshold turns the
    adjustment off: each tensor of 128 KiB or more is its own mapping, unmapped when freed, and
    peak RSS follows the live tensors (what ``lorakit plan`` counts). The cost is a page fault
    per fresh page instead of reused heap, and it is large: a training step took 1.6-1.7x as long
    (``benchmarks/bench_train.py``, contender ``lorakit_return``). So it is opt-in, for a CPU
    run that must fit in less RAM: ``LORAKIT_MALLOC=return``. Left alone when the user set
    one of glibc's ``MALLOC_*`` variables, or the C library is not glibc.
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


@contextlib.contextmanager
def loading_memory() -> Iterator[None]:
    """Around loading (and quantizing) a model on CPU: freed memory goes back to the OS during
    the block, and what the block left free in the heap is released at its end.

    Quantizing a checkpoint while it loads makes a full-precision temporary of every weight
    next to a small result that stays. Under ``LORAKIT_MALLOC=keep`` (blocks up to 256 MiB from
    the heap) those temporaries are freed into a heap pinned by the results, and much of that
    memory is never reused: loading SmolLM2-1.7B's shapes in 4-bit left 2.8-6.6 GB of
    anonymous memory where the live tensors were 1.1 GB, varying run to run, so a QLoRA run's
    peak RSS was set by loading, not training (``benchmarks/load_memory.py``; the quantization
    itself now works in chunks, ``lorakit.quantize_cpu``). Inside the block
    the mmap threshold is ``return``'s (each tensor of 128 KiB or more is its own mapping,
    unmapped when freed); at its end ``malloc_trim`` gives back the free heap and ``keep``'s
    thresholds come back for the steps. Under ``return`` only the trim runs; with ``glibc`` (or
    a ``MALLOC_*`` variable the user set) nothing is changed; in a process that never called
    :func:`configure_malloc` only the trim. Nested blocks act once, at the outermost."""
    global _loading_depth
    _loading_depth += 1
    left_alone = os.environ.get("LORAKIT_MALLOC", "").strip().lower() == "glibc"
    libc = _glibc() if _loading_depth == 1 and not left_alone else None
    switched = bool(
        libc is not None
        and _malloc_in_effect == "keep"
        and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    )
    try:
        yield
    finally:
        _loading_depth -= 1
        if libc is not None:
            libc.malloc_trim(0)
        if switched:
            keep_freed_memory()


@contextlib.contextmanager
def objects_frozen_for_gc() -> Iterator[None]:
    """While the block runs, Python's cyclic garbage collector leaves alone the objects alive
    when it starts (``gc.freeze``): the libraries, the model's modules, the data. A full
    collection then scans only what the block made. accelerate's ``free_memory`` runs one at
    the start of every ``Trainer.train`` (0.25 s over the ~570k objects of a run with torch,
    transformers and TRL imported, measured on a 2-core Xeon), and so may Python itself when
    the block allocates enough. They are unfrozen at the end, so what became garbage in
    between is collected as usual afterwards."""
    import gc

    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def peak_memory_gb() -> float:
    """Peak memory of this process so far: CUDA max allocated on a GPU, else peak RSS."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
