"""Write a merged model as one GGUF file (llama.cpp, Ollama, LM Studio) with the ``gguf`` package.

Supported: the Llama tensor layout (Llama, SmolLM, Mistral) and Qwen2. llama.cpp computes
rotary embeddings on interleaved pairs while transformers rotates the two halves of each head,
so for the ``llama`` architecture the rows of the q and k projections are reordered within each
head (transformers' GGUF loader undoes exactly this). Qwen2 files keep the transformers order.

Types: ``f32`` (every tensor as trained), ``f16`` and ``q8_0`` (matrices converted, norms and
biases kept in f32; a matrix whose rows are not a multiple of 32 values stays f16 in q8_0).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import attrs

from lorakit.errors import ModelError, RunError
from lorakit.export.gguf_vocab import Vocab, add_vocab
from lorakit.progress import enabled as progress_bars

GGUF_TYPES = ("f32", "f16", "q8_0")  # written here; K-quants: llama_quantize, from an f32 file
# transformers model_type -> llama.cpp architecture
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # gguf.LlamaFileType values
Q8_BLOCK = 32


@attrs.frozen
class Layout:
    """What the writer needs to know about a supported model."""

    arch: str  # llama.cpp architecture
    permute_qk: bool
    context_length: int


def check_layout(config: Any) -> Layout:
    """Raise ``ModelError`` naming what a GGUF could not represent; else describe the layout."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ModelError(
            f"GGUF export does not support the {model_type!r} architecture "
            f"({', '.join(getattr(config, 'architectures', None) or ['?'])})",
            fix=f"GGUF export supports {', '.join(sorted(ARCHITECTURES))}; export without "
            "--gguf (the merged safetensors export works for every architecture)",
        )
    problems = []
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope scaling {rope.get('rope_type')!r}")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"activation {config.hidden_act!r}")
    if model_type != "qwen2" and (
        getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
    ):
        problems.append("attention or MLP biases")
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        problems.append("sliding-window attention")
    if problems:
        raise ModelError(
            f"this {model_type} model has {', '.join(problems)}, which lorakit's GGUF writer "
            "does not represent",
            fix="export without --gguf (the merged safetensors export is unaffected)",
        )
    context = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None) if model_type == "mistral" else None
    if window:
        # llama.cpp runs Mistral as full attention: exact only up to the window.
        context = min(context, int(window))
    return Layout(ARCHITECTURES[model_type], model_type != "qwen2", context)


def rotary_to_interleaved(weight: Any, n_heads: int) -> Any:
    """Reorder the rows of a q/k projection from halves-per-head to interleaved pairs."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _head_dim(config: Any) -> int:
    return int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )


def _hparams(writer: Any, config: Any, layout: Layout) -> None:
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = _head_dim(config)
    writer.add_context_length(layout.context_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _convert(array: Any, gguf_type: str) -> tuple[Any, Any]:
    """(data, raw ggml type or None) for one tensor in ``gguf_type``."""
    import gguf
    import numpy as np

    if array.ndim == 1 or gguf_type == "f32":
        return array.astype(np.float32), None
    if gguf_type == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array.astype(np.float32), kind), kind
    with np.errstate(over="ignore"):  # overflow is reported below, with the fix
        half = array.astype(np.float16)
    if not np.isfinite(half).all():
        raise RunError(
            f"a weight overflows float16 (|value| > 65504) in the {gguf_type} GGUF",
            fix="export with --gguf-type f32 (or q8_0, which scales each block)",
        )
    return half, None


def _tensors(model: Any, layout: Layout) -> list[tuple[str, Any]]:
    """(GGUF name, fp32 numpy array) for every weight, in llama.cpp's layout."""
    import gguf
    import torch

    config = model.config
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == layout.arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # a GGUF without output.weight ties it to token_embd
        stem, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(stem)
        if gguf_name is None:
            raise ModelError(
                f"the {config.model_type} model has a tensor {hf_name} with no GGUF name",
                fix="export without --gguf; this model's layout differs from the standard one",
            )
        value = tensor.detach().to(torch.float32).cpu()
        if not bool(torch.isfinite(value).all()):
            raise RunError(
                f"merged weight {hf_name} holds NaN or Inf values; no GGUF was written",
                fix="check the adapter: `lorakit eval` on the run should give a finite loss",
            )
        if layout.permute_qk and suffix == "weight" and gguf_name.endswith(("attn_q", "attn_k")):
            heads = config.num_attention_heads if gguf_name.endswith("attn_q") else kv_heads
            value = rotary_to_interleaved(value, heads)
        out.append((f"{gguf_name}.{suffix}", value.contiguous().numpy()))
    return out


def write_gguf(
    model: Any, vocab: Vocab, path: Path, gguf_type: str, *, name: str, description: str = ""
) -> dict[str, Any]:
    """Write ``model`` (a merged transformers causal LM) and ``vocab`` to ``path``; return a
    summary (architecture, tensor count, bytes)."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise RunError(
            f"unknown GGUF type {gguf_type!r}", fix=f"use one of {', '.join(GGUF_TYPES)}"
        )
    layout = check_layout(model.config)
    tensors = _tensors(model, layout)
    writer = gguf.GGUFWriter(str(path), layout.arch)
    complete = False
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        if description:
            writer.add_description(description)
        writer.add_file_type(_FILE_TYPES[gguf_type])
        if gguf_type == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hparams(writer, model.config, layout)
        add_vocab(writer, vocab)
        for tensor_name, array in tensors:
            data, raw = _convert(array, gguf_type)
            writer.add_tensor(tensor_name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress_bars())
        writer.close()
        complete = True
    finally:
        if not complete:  # a file cut short (disk full, an error) is never left to look whole
            with contextlib.suppress(OSError):  # closing flushes the rest: it may fail too
                writer.close()
            path.unlink(missing_ok=True)
    return {
        "architecture": layout.arch,
        "type": gguf_type,
        "tensors": len(tensors),
        "bytes": path.stat().st_size,
        "context_length": layout.context_length,
    }
