"""Before the first packed step: do the examples of a packed row stay apart on this model?

lorakit packs a micro-batch into one row and relies on the model to keep its examples apart:
attention cut at ``cu_seq_lens`` (``lorakit.attention``), positions restarting at 0. A model
whose attention goes through transformers' AttentionInterface gets that; one that mixes
positions some other way (a convolution or state-space layer, linear attention without
sequence boundaries, an attention class that ignores the interface) lets one example see the
one before it, and training on such rows is silently contaminated (trl#1163).

The probe asks the model itself, on the attention path the run uses: two forwards of a short
packed row ``[x, y]`` and ``[x', y]``, where ``x'`` differs from ``x`` in every token and has its
length. ``y`` sits at the same place with the same shapes in both, so every kernel computes its
logits with the same operations in the same order, and they come out bit-identical unless
something carries ``x`` into ``y``. (Kernels that are not deterministic would differ on the same
input too: then a third forward measures that noise, and only a difference well past it counts.)
A bit-for-bit test is what keeps the probe sharp in bf16: a small random model's conv layers
move ``y``'s logits by 4e-4 in fp32, about one bf16 step, which any tolerance would miss.

Architectures lorakit's tests train packed pass without a probe (:data:`VERIFIED`); any other
passes once per model type, attention implementation and transformers version, recorded in
``$LORAKIT_CACHE/packing_verified.json``. A failure is never recorded: it refuses the run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lorakit.attention import NAME
from lorakit.errors import ModelError

# (model_type, attention implementation) pairs verified by the test suite: it trains the tiny
# Llama (SmolLM2 is a Llama) and the tiny Mistral packed, and tests/test_packing_probe.py probes
# all three, qwen2 included, in fp32 and bf16.
VERIFIED = frozenset({("llama", NAME), ("mistral", NAME), ("qwen2", NAME)})

# the probe row: two examples of this many tokens (short enough for any sliding window)
PROBE_LENGTHS = (12, 10)


def cache_file() -> Path:
    root = Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))
    return root / "packing_verified.json"


def probe_key(model: Any) -> tuple[str, str]:
    """(model_type, attention implementation) of a transformers model, possibly PEFT-wrapped."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(base.config.model_type), str(base.config._attn_implementation)


def rows_hold_several(train: Any) -> bool:
    """Can a packed row of this ``[train]`` section hold more than one example? Always with a
    preference objective: a pair's two answers share a row (KTO: an answer and its mismatched
    row), and the reference pass packs several pairs."""
    return bool(
        train.objective != "sft"
        or train.packing
        or train.per_device_train_batch_size > 1
        or train.per_device_eval_batch_size > 1
    )


def check_packing(train: Any, model: Any, say: Any = None) -> None:
    """Refuse to train when the examples of a packed row would see each other. Call with
    packed attention switched on (``lorakit.attention.packed_attention``). No work when rows hold
    one example each, or the architecture is verified (built in or cached)."""
    if not rows_hold_several(train):
        return
    model_type, implementation = probe_key(model)
    if (model_type, implementation) in VERIFIED:
        return
    import transformers

    key = f"{model_type}|{implementation}|transformers {transformers.__version__}"
    path = cache_file()
    known = _read(path)
    if key in known:
        return
    started = time.perf_counter()
    leak = probe(model)
    if leak is not None:
        found = (
            f"packed rows leak between examples on this {model_type} model (attention "
            f"{implementation}): changing the first example of a packed row changed the logits "
            f"of the next one by up to {leak:.3g}, so "
        )
        if train.objective != "sft":
            raise ModelError(
                found + f"objective {train.objective!r} would score each answer with the other "
                "answers of its row in view: lorakit packs a pair's answers (KTO: an answer "
                "and its mismatched row) into one row, whatever the batch sizes",
                where="train.objective",
                fix='train this architecture with objective = "sft" and one example per '
                "row (train.per_device_train_batch_size=1 train.per_device_eval_batch_size=1 "
                "train.packing=false), or pick a model whose layers keep packed examples "
                "apart (llama, mistral, qwen2)",
            )
        raise ModelError(
            found + "training on packed rows would let examples see each other",
            where="[train]",
            fix="train one example per row: train.per_device_train_batch_size=1 "
            "train.per_device_eval_batch_size=1 train.packing=false (raise "
            "gradient_accumulation_steps for a larger batch)",
        )
    if say is not None:
        took = time.perf_counter() - started
        say(
            f"packing probe: {model_type} ({implementation}) keeps packed examples apart ({took:.2f} s)"
        )
    from lorakit.distributed import is_main

    if is_main():
        known[key] = {"verified": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write(path, known)


def probe(model: Any) -> float | None:
    """None when the examples of a packed row stay apart on ``model``; else the largest change
    of the second example's logits caused by changing the first."""
    import torch

    from lorakit.packing import pack

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vocab = int(base.get_input_embeddings().weight.shape[0])
    device = base.get_input_embeddings().weight.device
    generator = torch.Generator().manual_seed(0)
    n_x, n_y = PROBE_LENGTHS
    # ids away from 0..9 (special tokens in most vocabularies); x' shifts every token of x
    low = 10 if vocab > 20 else 0
    span = vocab - low
    x = torch.randint(low, vocab, (n_x,), generator=generator)
    y = torch.randint(low, vocab, (n_y,), generator=generator).tolist()
    x_other = ((x - low + span // 2) % span + low).tolist()

    def second(first: list[int]) -> Any:
        batch = pack([{"input_ids": ids, "labels": ids} for ids in (first, y)])
        inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        inputs.pop("labels"), inputs.pop("row_index")
        out = model(**inputs, use_cache=False, **keep)
        return out.logits[0, -n_y:].float()

    from lorakit.loss import accepts_logits_to_keep

    keep = {"logits_to_keep": n_y} if accepts_logits_to_keep(model) else {}  # y's logits only
    was_training = model.training
    model.eval()  # no dropout: the only thing that differs between the forwards is x
    try:
        with torch.no_grad():
            a, b = second(x.tolist()), second(x_other)
            if torch.equal(a, b):
                return None
            noise = float((second(x.tolist()) - a).abs().max())
    finally:
        model.train(was_training)
    change = float((a - b).abs().max())
    # nondeterministic kernels: the same input differs by ``noise``; count only what is well past
    return change if change > 4 * noise else None


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the probe again next run
