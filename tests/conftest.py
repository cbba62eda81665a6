"""Fixtures over the toolkit in ``helpers.py`` (import helpers from there, not from here).

Tests that train, load the embedded model or run ``lorakit run`` are marked ``slow``:
``pytest -m "not slow"`` runs the rest in seconds. Two guards keep it so: an unmarked test that
trains in-process fails (``run_recipe`` refuses), and so does one whose subprocesses (``lorakit
run``, torchrun and its ranks, a child that imports the training stack) use more than
``CHILD_CPU_LIMIT_S`` seconds of CPU, its fixtures' included.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    build_data_tokenizer,
    build_tiny_model,
    chat_records,
    uninstalled_entry_points,
    write_jsonl,
)

# A worker's peak memory, with room to spare: the largest process of a whole `-n 2` run (a
# worker, or a run it started) peaked at 3.3 GB resident (2026-12-07).
WORKER_MEMORY_GB = 4


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: the suite also runs without xdist
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core this process may use, as many as the memory holds."""
    from lorakit.device import available_memory, usable_cores

    available = available_memory()
    if available is None:
        return usable_cores()
    return max(1, min(usable_cores(), available // (WORKER_MEMORY_GB * 2**30)))


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n auto``), give each worker its own cores.

    Each worker and every process it starts (``lorakit run``, torchrun and its ranks) may run
    only on its share of this machine's cores, so lorakit's thread count (``usable_cores``)
    divides them as it would on a smaller machine. Two workers whose OpenMP teams both spin on
    the same 2 cores would run each other's training 8-20x slower.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    share = cores[int(worker[2:]) % count :: count] if len(cores) >= count else cores
    os.sched_setaffinity(0, share)
    import torch

    torch.set_num_threads(len(share))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder with the tiny random Llama and its tokenizer (``helpers.build_tiny_model``)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def data_tokenizer() -> Any:
    """The data tests' tokenizer (``helpers.build_data_tokenizer``)."""
    return build_data_tokenizer()


@pytest.fixture(scope="session")
def data_tokenizer_dir(data_tokenizer, tmp_path_factory) -> Path:
    """``data_tokenizer`` saved to a folder (for ``LiteTokenizer`` and ``check --tokenizer``)."""
    folder = tmp_path_factory.mktemp("data_tokenizer")
    data_tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(params=["fp32", "bf16"])
def compute_dtype(request, monkeypatch) -> str:
    """Each compute dtype lorakit trains in on a CPU, whatever this CPU's ``auto`` picks.

    ``auto`` is bf16 on CPUs with AVX512-BF16 or AMX and fp32 elsewhere, so a guarantee that
    held only in one of them would pass or fail with the machine. Forced bf16 runs everywhere
    (emulated, slowly, where the CPU lacks it; the tiny model keeps that cheap).

    In bf16, examples from 16 keys attend through ``lorakit.math_attention`` (from 96 in a
    real run), and from 32 queries in blocks of 16 (from 384 in blocks of 192 in a real run),
    so the tiny test examples take the paths that real bf16 examples take.
    """
    if request.param == "bf16":
        from lorakit import math_attention

        monkeypatch.setattr(math_attention, "MIN_KEYS", 16)
        monkeypatch.setattr(math_attention, "BLOCK_QUERIES", 16)
    return request.param


@pytest.fixture()
def chat_file(tmp_path) -> Path:
    """40 chat_jsonl records in ``tmp_path/chat.jsonl``."""
    return write_jsonl(tmp_path / "chat.jsonl", chat_records(40))


@pytest.fixture()
def cli(capsys):
    """Run the lorakit CLI in-process; returns (exit code, stdout, stderr)."""
    from lorakit.cli.main import main

    def run(*args: Any) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse: --help, usage errors
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"))


@pytest.fixture(autouse=True)
def _training_tests_are_slow(request, monkeypatch):
    """A test that trains in-process must be marked ``slow``, so ``-m "not slow"`` stays fast."""
    if request.node.get_closest_marker("slow") is None:

        def refuse(*args: Any, **kwargs: Any) -> None:
            pytest.fail(f"{request.node.nodeid} trains: mark it @pytest.mark.slow", pytrace=False)

        monkeypatch.setattr("lorakit.runner.run_recipe", refuse)


# CPU seconds an unmarked test's finished subprocesses may use. Measured on a 2-core dev box:
# the unmarked tests' children (``lorakit check``/``plan``, ``import lorakit.api``) use under
# 1 s; a child that imports torch + transformers uses about 6 s before it trains a step.
# CPU time, not wall time: it does not grow when the machine is busy with other work.
CHILD_CPU_LIMIT_S = 3.0
_CHILD_CPU_AT_START = pytest.StashKey[float]()


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished (waited-for) children, and theirs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_CHILD_CPU_AT_START] = children_cpu_s()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """After an unmarked test's teardown: fail it when its subprocesses did a slow test's work."""
    outcome = yield
    start = item.stash.get(_CHILD_CPU_AT_START, None)
    if call.when != "teardown" or start is None or item.get_closest_marker("slow") is not None:
        return
    spent = children_cpu_s() - start
    report = outcome.get_result()
    if spent > CHILD_CPU_LIMIT_S and report.passed:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid}: its subprocesses used {spent:.1f} s of CPU (more than "
            f"{CHILD_CPU_LIMIT_S:.0f} s: they train, start ranks or load the training stack); "
            "mark it @pytest.mark.slow"
        )


@pytest.fixture()
def branch_plugins(tmp_path_factory, monkeypatch) -> None:
    """Built-in plugins this tree declares but the installed metadata lacks (until the next
    ``pip install -e``) are found by the catalog, in this process and its children
    (``helpers.uninstalled_entry_points``)."""
    import lorakit.catalog

    site = uninstalled_entry_points(tmp_path_factory.mktemp("branch-site"))
    if site is not None:
        monkeypatch.syspath_prepend(str(site))
        path = os.environ.get("PYTHONPATH", "")
        monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{path}" if path else str(site))
    monkeypatch.setattr(lorakit.catalog, "_DEFAULT", None)
