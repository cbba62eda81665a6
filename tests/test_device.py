"""Compute dtype and thread choices: measured, cached, never assumed from the CPU's name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from lorakit import device


def test_no_bf16_instructions_means_fp32_without_timing(monkeypatch):
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(device, "matmul_flops", lambda *a, **k: pytest_fail())
    assert device.auto_compute_dtype("cpu") == torch.float32
    assert device.dtype_from_name("auto", "cpu") == torch.float32


def pytest_fail():
    raise AssertionError("must not time a matmul when the CPU has no bf16 instructions")


def test_bf16_flags_are_timed_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx512_bf16"})
    calls = []

    def fake(dtype, **kwargs):
        calls.append(dtype)
        return 2e11 if dtype == torch.bfloat16 else 1e11

    monkeypatch.setattr(device, "matmul_flops", fake)
    assert device.auto_compute_dtype("cpu") == torch.bfloat16
    assert device.auto_compute_dtype("cpu") == torch.bfloat16
    assert calls == [torch.float32, torch.bfloat16], "timed once, then read from the cache"
    cached = json.loads((tmp_path / "cpu_dtype.json").read_text())
    assert [v["bf16_gflops"] for v in cached.values()] == [200.0]
    # the torch-free reader (`lorakit plan`/preflight) sees the same decision
    from lorakit.preflight import _auto_dtype

    assert device.cached_bf16_choice(torch.__version__) is True
    assert _auto_dtype("cpu") == "bf16"
    assert device.cached_bf16_choice("0.0-never-timed") is None
    (tmp_path / "cpu_dtype.json").write_text(json.dumps({device._dtype_key("9"): []}))
    assert device.cached_bf16_choice("9") is None, "an entry that is not a timing"
    (tmp_path / "cpu_dtype.json").write_text("[1]")
    assert device.cached_bf16_choice(torch.__version__) is None
    assert _auto_dtype("cpu") == "fp32"


def test_the_cached_dtype_choice_is_keyed_by_cpu_family_and_model():
    """Zen 4 (bf16 ~1.9x fp32) and Zen 5 (~3.7x) both read "AMD EPYC" in a VM: the family and
    model numbers keep their timings apart; only the first processor's block is read."""
    block = "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: {f}\nmodel\t\t: {m}\n"
    block += "model name\t: AMD EPYC\nflags\t\t: fpu avx512_bf16\n\n"
    zen4 = block.format(n=0, f=25, m=17) + block.format(n=1, f=26, m=2)
    assert device._cpu_model(zen4) == "AMD EPYC (family 25 model 17)"
    assert device._cpu_model(block.format(n=0, f=26, m=2)) == "AMD EPYC (family 26 model 2)"
    assert device._cpu_model("model name\t: Some CPU\n") == "Some CPU"
    assert device._cpu_model("") == "unknown"


def test_bf16_flags_but_slow_bf16_stays_fp32(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(device, "cpu_flags", lambda: {"amx_bf16"})
    monkeypatch.setattr(
        device, "matmul_flops", lambda dtype, **k: 1e10 if dtype == torch.bfloat16 else 1e11
    )
    assert device.auto_compute_dtype("cpu") == torch.float32


def test_matmul_flops_counts_two_n_cubed_per_product(monkeypatch):
    """FLOP/s = 2 * size^3 per product over the elapsed time, on a fake clock (no test times a
    real operation): every reading advances it 0.01 s, so 0.05 s take 5 products."""
    ticks = iter(i * 0.01 for i in range(1000))
    monkeypatch.setattr(device.time, "perf_counter", lambda: next(ticks))
    assert device.matmul_flops(torch.float32, size=8, seconds=0.05) == pytest.approx(
        2 * 8**3 * 5 / 0.05
    )


def test_threads_follow_request_env_and_ranks_per_node(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(device, "usable_cores", lambda: 8)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        assert device.configure_threads() == 2, "8 cores shared by 4 ranks on this node"
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert device.configure_threads() == 3, "the user's OMP_NUM_THREADS wins over auto"
        assert device.configure_threads(1) == 1, "train.threads wins over everything"
    finally:
        torch.set_num_threads(before)


def test_objects_frozen_for_gc_spares_old_objects_and_collects_them_afterwards():
    """The collector skips what was alive when the block began (a full collection inside
    it does not see them), and after the block a cycle dropped inside it is collected."""
    import gc
    import weakref

    from lorakit.device import objects_frozen_for_gc

    class Node:
        pass

    old = Node()
    old.self = old  # a reference cycle: only the cyclic collector frees it
    gone = weakref.ref(old)
    assert gc.get_freeze_count() == 0
    with objects_frozen_for_gc():
        assert gc.get_freeze_count() > 0
        del old
        gc.collect()
        assert gone() is not None, "frozen: not collected inside the block"
        fresh = Node()
        fresh.self = fresh
        fresh_ref = weakref.ref(fresh)
        del fresh
        gc.collect()
        assert fresh_ref() is None, "what the block makes is collected as usual"
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert gone() is None, "unfrozen: collected after the block"


LOADING_CHURN = """
import os, sys
import torch
from lorakit import device

os.environ["LORAKIT_MALLOC"] = "keep"
assert device.configure_malloc() == "keep"


def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024


live = []
before = anon_mb()
with device.loading_memory():
    with device.loading_memory():  # nested: only the outermost block acts
        # what quantizing a checkpoint does: a large temporary per weight, a small result kept
        for i in range(24):
            temporary = torch.ones((32 + i) * 2**18)  # 32-55 MiB
            live.append(torch.ones(2**18))  # 1 MiB
            del temporary
    inside = anon_mb() - before
after_block = anon_mb() - before
# keep's thresholds are back: a freed 64 MiB block stays in the heap for the next step
again = torch.ones(2**24)
del again
kept = anon_mb() - before
print(round(inside), round(after_block), round(kept))
"""


@pytest.mark.slow  # its child imports torch: 2-3 s of CPU, at conftest's limit for unmarked tests
@pytest.mark.skipif(
    not os.path.exists("/proc/self/status") or not device._glibc(),
    reason="needs Linux and glibc",
)
def test_loading_memory_returns_what_loading_frees_and_then_keeps_again():
    """Under LORAKIT_MALLOC=keep a heap pinned by small live blocks kept the freed temporaries
    of a 4-bit load (1.7B shapes: up to 6.6 GB left for 1.1 GB of tensors). Inside the block memory
    follows the 24 MiB kept; after it, keep's 256 MiB mmap threshold holds again."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("LORAKIT_MALLOC", None)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        env.pop(name, None)
    out = subprocess.run(
        [sys.executable, "-c", LOADING_CHURN], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    inside, after_block, kept = (int(x) for x in out)
    assert inside <= 24 + 32, f"{inside} MiB resident after 24 MiB of live blocks"
    assert after_block <= 24 + 32
    assert kept >= after_block + 48, "a freed 64 MiB block went back to the OS: keep not restored"
