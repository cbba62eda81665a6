"""Where a CPU training run's memory goes: RSS, peak RSS and glibc's heap, stage by stage.

    .venv/bin/python benchmarks/memory_stages.py RECIPE [KEY=VALUE ...] [--steps 2]

Follows `lorakit run`'s own path (runner.py steps 2-10: data, tokenizer, the fixed mmap
threshold unless ``--glibc-default``, model load, k-bit preparation, adapter, fast dropout,
fused LoRA layers and RMSNorm, lorakit's Trainer with packed attention; rows packed whole, without
``train.share_prefix``) and prints, for every stage, the process's RSS after it, the peak RSS *during* it (``VmHWM``, reset before each
stage through ``/proc/self/clear_refs``), glibc's bytes in use and free-but-kept
(``mallinfo2``), and in the forward pass the bytes autograd saved for backward
(``saved_tensors_hooks``, each storage counted once). Memory only; no timing.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import sys
from pathlib import Path
from typing import Any

MiB = 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def status() -> tuple[int, int]:
    text = Path("/proc/self/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) * 1024  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) * 1024  # type: ignore[union-attr]
    return rss, hwm


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def heap() -> tuple[int, int]:
    """(bytes in use, bytes free but kept) by glibc malloc, all arenas and mmapped chunks."""
    m = _libc.mallinfo2()
    return m.uordblks + m.hblkhd, m.fordblks


ROWS: list[tuple[str, int, int, int, int, str]] = []


def mark(stage: str, note: str = "") -> None:
    rss, hwm = status()
    used, free = heap()
    ROWS.append((stage, rss, hwm, used, free, note))
    print(
        f"{stage:<28} rss {rss / MiB:8.0f} MiB  peak {hwm / MiB:8.0f} MiB  "
        f"malloc used {used / MiB:8.0f}  free-kept {free / MiB:7.0f}  {note}",
        flush=True,
    )
    reset_peak()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after every stage")
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="leave glibc's dynamic mmap threshold on (lorakit run fixes it on CPU)",
    )
    args = parser.parse_args()
    reset_peak()
    from lorakit.cli.main import _quiet_libraries

    _quiet_libraries("run")
    import torch
    import transformers
    from lorakit.attention import packed_attention
    from lorakit.catalog import default_catalog
    from lorakit.components import build_components
    from lorakit.data.pipeline import DataReport, load_splits, tokenize_examples
    from lorakit.device import configure_threads, resolve_device, return_freed_memory
    from lorakit.modeling import attach_new_adapter, load_base_model, load_tokenizer, resolve_model
    from lorakit.recipe import load_recipe
    from lorakit.tracking import Loggers
    from lorakit.training import build_trainer
    from transformers import TrainerCallback

    mark("imports")
    catalog = default_catalog()
    recipe = load_recipe(
        Path(args.recipe), [*args.overrides, f"train.max_steps={args.steps}"], catalog
    )
    t = recipe.train
    parts = build_components(recipe, catalog)
    splits = load_splits(parts.sources, recipe.data, recipe.recipe_dir, DataReport())
    ref = resolve_model(parts.model_source, recipe.model.name)
    tokenizer = load_tokenizer(ref, recipe_dir=recipe.recipe_dir)
    formatter = parts.formatter
    train_rows = tokenize_examples(
        splits.train, formatter, tokenizer, t.max_length, recipe.data.overlength, DataReport()
    )
    val_rows = tokenize_examples(
        splits.val, formatter, tokenizer, t.max_length, recipe.data.overlength, DataReport()
    )
    mark("data + tokenizer", f"{len(train_rows)} train rows")
    transformers.set_seed(t.seed)
    device = resolve_device(t.device)
    threads = configure_threads(t.threads)
    fixed = False if args.glibc_default or device != "cpu" else return_freed_memory()
    backend = parts.quant
    compute_dtype = backend.compute_dtype(device)
    model = load_base_model(ref, backend, device, recipe_dir=recipe.recipe_dir)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    mark(
        "model loaded",
        f"parameter bytes {params / MiB:.0f} MiB, {threads} threads, mmap threshold "
        + ("fixed" if fixed else "glibc default"),
    )
    model = backend.prepare_for_training(model, t.gradient_checkpointing)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    mark("prepared for training", f"parameter bytes {params / MiB:.0f} MiB")
    model = attach_new_adapter(model, parts.peft, t.seed)
    from lorakit.fast_dropout import use_fast_dropout
    from lorakit.fused_lora import use_fused_lora
    from lorakit.fused_norm import use_fused_norm

    # as runner.py does on CPU: fast dropout masks, each LoRA layer (and 4-bit layer) as one
    # autograd node, RMSNorm as one node
    use_fast_dropout(model)
    use_fused_lora(model)
    use_fused_norm(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mark("adapter attached", f"{trainable:,} trainable")

    out = Path("/tmp") / f"memory-stages-{id(args)}"
    trainer = build_trainer(
        recipe,
        model,
        train_rows,
        val_rows,
        out / "ckpt",
        Loggers(print),  # not opened: this script reads memory, not metrics
        device,
        compute_dtype,
    )
    mark("trainer built")
    params_at = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[str, Any] = {"bytes": 0, "ptrs": set()}

    def pack(x: Any) -> Any:
        try:
            ptr = x.untyped_storage().data_ptr()
            if ptr not in saved["ptrs"] and ptr not in params_at:
                saved["ptrs"].add(ptr)
                saved["bytes"] += x.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return x

    compute_loss = trainer.compute_loss

    def forward(*a: Any, **kw: Any) -> Any:
        saved["bytes"], saved["ptrs"] = 0, set()
        batch = a[1] if len(a) > 1 else kw["inputs"]
        tokens = int(batch["input_ids"].numel())
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = compute_loss(*a, **kw)
        if args.trim:
            _libc.malloc_trim(0)
        mark(
            "  forward",
            f"{tokens} tokens, saved for backward (no parameters) {saved['bytes'] / MiB:.0f} MiB",
        )
        return loss

    trainer.compute_loss = forward

    class Stages(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kw):
            mark(f"step {state.global_step + 1} begin")

        def on_pre_optimizer_step(self, args_, state, control, **kw):
            if args.trim:
                _libc.malloc_trim(0)
            mark("  backward (+ clip)")

        def on_optimizer_step(self, args_, state, control, **kw):
            if args.trim:
                _libc.malloc_trim(0)
            mark("  optimizer step")

    trainer.add_callback(Stages())
    with packed_attention(model, device):
        trainer.train()
    mark("train end")
    peak = max(r[2] for r in ROWS)
    print(f"overall peak RSS {peak / MiB:.0f} MiB = {peak / 2**30:.3f} GB", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
