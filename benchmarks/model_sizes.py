"""The model-size axis of ``bench_train.py``: which model folder each ``--model-size`` trains.

``135m`` is the embedded SmolLM2-135M-Instruct (converted once by the ``smollm2-135m-instruct``
model plugin). ``360m`` and ``1.7b`` are random-weight models with SmolLM2-360M's and
SmolLM2-1.7B's shapes; ``135m-narrow`` and ``1.7b-narrow`` have the layers, heads, vocabulary and
operators of SmolLM2-135M and -1.7B with heads of size 8 (see :data:`SHAPES`): a step's speed depends on the shapes, not on the weight values, and no
network is needed. Each is built once from the embedded model's config with the shape keys
replaced, saved with ``save_pretrained`` (safetensors, bf16 as on the Hub) together with the
embedded model's tokenizer (same vocabulary, same chat template), and then trained like any
``--model-path`` folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# The published SmolLM2 configs (HuggingFaceTB/SmolLM2-360M and -1.7B, and their -Instruct
# variants): Llama blocks, head size 64, vocabulary 49152, tied embeddings.
SHAPES: dict[str, dict[str, int | float]] = {
    "360m": {
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "rope_theta": 100000.0,
    },
    "1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "rope_theta": 130000.0,
    },
    # SmolLM2-135M's structure (30 layers, 9 heads over 3 KV heads, the same vocabulary and
    # operators) at width 72: heads of 8, an MLP of 96. Its step costs what a 135M step costs
    # apart from its width: each operator's call, the autograd graph, attention's per-score
    # work (scores, softmax: quadratic in an example's length, not in the width), the head's
    # softmax over the vocabulary, the optimizer. Faster matmuls (AMX) do not shrink that part.
    "135m-narrow": {
        "hidden_size": 72,
        "intermediate_size": 96,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rope_theta": 100000.0,
    },
    # SmolLM2-1.7B's structure (24 layers, 32 heads) the same way: width 256, heads of 8
    "1.7b-narrow": {
        "hidden_size": 256,
        "intermediate_size": 96,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "rope_theta": 130000.0,
    },
    # Mistral-7B's layers (its own vocabulary is 32000 and untied; here 49152, tied)
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 1000000.0,
    },
}
SIZES = ("135m", *SHAPES)
COMPLETE = "BENCH_COMPLETE"


def cache_folder(results: Path) -> Path:
    """Where built models live: ``$LORAKIT_CACHE/bench-models``, else ``.models`` beside
    ``results`` (git-ignored)."""
    env = os.environ.get("LORAKIT_CACHE")
    return Path(env) / "bench-models" if env else results.parent / ".models"


def embedded_folder() -> Path:
    from lorakit_plugins.models.smollm2 import ensure_cached

    return ensure_cached()


def sized_config(base: dict, size: str) -> dict:
    """``base`` (a config.json dict) with the shape keys of ``size``."""
    shape = dict(SHAPES[size])
    theta = shape.pop("rope_theta")
    config = {k: v for k, v in base.items() if k not in ("_model_name_or_path", "rope_theta")}
    config.update(shape)
    config["head_dim"] = int(shape["hidden_size"]) // int(shape["num_attention_heads"])
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    config["tie_word_embeddings"] = True
    config["vocab_size"] = 49152
    return config


def model_folder(size: str, results: Path) -> Path:
    """The model folder of ``size``, built on first use (atomic: a half-written one is never
    used)."""
    embedded = embedded_folder()
    if size == "135m":
        return embedded
    target = cache_folder(results) / f"smollm2-{size}-random"
    if (target / COMPLETE).is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    base = json.loads((embedded / "config.json").read_text(encoding="utf-8"))
    config = LlamaConfig.from_dict(sized_config(base, size))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(str(tmp), safe_serialization=True)
        del model
        AutoTokenizer.from_pretrained(str(embedded)).save_pretrained(str(tmp))
        (tmp / COMPLETE).write_text(f"random weights, SmolLM2-{size.upper()} shapes\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
