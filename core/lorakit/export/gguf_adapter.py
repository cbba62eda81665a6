"""The adapter alone as a GGUF LoRA file, for ``llama-cli -m BASE.gguf --lora ADAPTER.gguf``.

llama.cpp's LoRA format (``general.type = adapter``, ``adapter.type = lora``) stores, for each
adapted weight ``W`` named like the base model's tensor, ``<name>.lora_a`` (r x in) and
``<name>.lora_b`` (out x r); llama.cpp adds ``alpha / r * B @ A`` with ``r`` taken from the
tensors. rsLoRA's scale ``alpha / sqrt(r)`` is written as the equivalent ``alpha``. Because the
base's q/k rows are reordered for llama.cpp's rotary layout (see ``gguf_writer``), the rows of
``lora_b`` for q/k are reordered the same way. What the format cannot express is refused with
the reason: DoRA, trained biases, per-module ranks or alphas, fully trained modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.errors import RunError
from lorakit.export.gguf_writer import check_layout, rotary_to_interleaved
from lorakit.progress import enabled as progress_bars

PREFIX = "base_model.model."


def unsupported_reason(adapter_config: dict[str, Any]) -> str | None:
    """Why this adapter cannot be a llama.cpp LoRA GGUF, or None when it can."""
    if adapter_config.get("peft_type", "LORA") != "LORA":
        return f"it is a {adapter_config.get('peft_type')} adapter, not LoRA"
    if adapter_config.get("use_dora"):
        return "DoRA adapters have a magnitude vector llama.cpp's LoRA format does not hold"
    if adapter_config.get("bias", "none") != "none":
        return "the adapter trained biases, which llama.cpp's LoRA format does not hold"
    if adapter_config.get("modules_to_save"):
        return "the adapter fully trains modules (modules_to_save); only a merged GGUF holds those"
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        return "the adapter has per-module ranks or alphas; llama.cpp reads one alpha per file"
    return None


def unsupported_tensors(adapter_dir: Path) -> str | None:
    """Why the adapter's tensors cannot be a llama.cpp LoRA GGUF, or None when each is a LoRA A
    or B matrix: LoRA on embeddings (``lora_embedding_A``/``B``) and base layers PEFT saved
    with the adapter are not, and llama.cpp's LoRA format holds nothing else."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        keys = f.keys()
        other = [k for k in keys if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if not other:
        return None
    return (
        f"the adapter holds {len(other)} tensors that are not LoRA A/B matrices of linear "
        f"layers (e.g. {other[0]}: LoRA on the embeddings, or a layer saved whole), which "
        "llama.cpp's LoRA format does not hold; the merged GGUF holds them"
    )


def lora_scale(adapter_config: dict[str, Any]) -> float:
    r, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    return alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r


def _pairs(weights: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """module path (``model.layers.0.self_attn.q_proj``) -> (A, B)."""
    pairs: dict[str, list[Any]] = {}
    for key, tensor in weights.items():
        for part, slot in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if key.endswith(part):
                module = key[: -len(part)].removeprefix(PREFIX)
                pairs.setdefault(module, [None, None])[slot] = tensor
                break
        else:
            raise RunError(
                f"the adapter holds a tensor {key} that is not a LoRA A/B matrix",
                fix="export without the adapter GGUF (the merged GGUF holds everything)",
            )
    return {m: (a, b) for m, (a, b) in pairs.items() if a is not None and b is not None}


def write_adapter_gguf(
    adapter_dir: Path, adapter_config: dict[str, Any], base_config: Any, path: Path, name: str
) -> dict[str, Any]:
    """Write the adapter in ``adapter_dir`` as a llama.cpp LoRA GGUF (f32) at ``path``."""
    import gguf
    import torch
    from safetensors.torch import load_file

    layout = check_layout(base_config)
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == layout.arch)
    names = gguf.get_tensor_name_map(arch, base_config.num_hidden_layers)
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs = _pairs(weights)
    r = int(adapter_config["r"])
    kv_heads = base_config.num_key_value_heads or base_config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), layout.arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        # llama.cpp scales by alpha / r; this alpha gives peft's scale (also for rsLoRA).
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora_scale(adapter_config) * r)
        for module, (a, b) in sorted(pairs.items()):
            target = names.get_name(module)
            if target is None:
                raise RunError(
                    f"the adapter adapts {module}, which has no tensor in a {layout.arch} GGUF",
                    fix="export without the adapter GGUF (the merged GGUF holds everything)",
                )
            b = b.to(torch.float32)
            if layout.permute_qk and target.endswith(("attn_q", "attn_k")):
                heads = base_config.num_attention_heads if target.endswith("attn_q") else kv_heads
                b = rotary_to_interleaved(b, heads)
            writer.add_tensor(f"{target}.weight.lora_a", a.to(torch.float32).contiguous().numpy())
            writer.add_tensor(f"{target}.weight.lora_b", b.contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress_bars())
    finally:
        writer.close()
    return {"modules": len(pairs), "rank": r, "alpha": lora_scale(adapter_config) * r}


def check_adapter_gguf(
    path: Path, adapter_dir: Path, adapter_config: dict[str, Any], base_config: Any
) -> dict[str, Any]:
    """Read the file back (``gguf.GGUFReader``; q/k rows restored with transformers' own GGUF
    code) and compare each ``alpha / r * B @ A`` with the adapter's delta; return the numbers."""
    import gguf
    import numpy as np
    from gguf import GGUFReader
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = GGUFReader(str(path))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {
        t.name: np.asarray(t.data).reshape([int(n) for n in reversed(t.shape)])
        for t in reader.tensors
    }
    restore = LlamaTensorProcessor(
        config={
            "num_attention_heads": base_config.num_attention_heads,
            "num_key_value_heads": base_config.num_key_value_heads
            or base_config.num_attention_heads,
        }
    )
    expected = _pairs(load_file(str(adapter_dir / "adapter_model.safetensors")))
    layout = check_layout(base_config)
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == layout.arch)
    names = gguf.get_tensor_name_map(arch, base_config.num_hidden_layers)
    by_name = {f"{names.get_name(m)}.weight": m for m in expected}
    scale = lora_scale(adapter_config)
    worst = 0.0
    if len(tensors) != 2 * len(expected):
        raise RunError(
            f"the adapter GGUF holds {len(tensors)} tensors for {len(expected)} LoRA modules",
            fix="report this bug; the merged GGUF is unaffected",
        )
    for name in {n.rsplit(".", 1)[0] for n in tensors}:
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        if layout.permute_qk:
            b = restore.process(b, name).weights
        got = alpha / a.shape[0] * (b.astype(np.float64) @ a.astype(np.float64))
        if name not in by_name:
            raise RunError(
                f"the adapter GGUF holds {name}, not in the adapter", fix="report this bug"
            )
        ea, eb = expected[by_name[name]]
        want = scale * (eb.double() @ ea.double()).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
    if not worst <= 1e-5:
        raise RunError(
            f"the adapter GGUF read back differs from the adapter by up to {worst:.3g}",
            fix="report this bug; the merged GGUF is unaffected",
        )
    return {"modules": len(expected), "max_abs_delta_diff": worst}


def export_adapter_gguf(
    run: Any, config: Any, folder: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    """The run's adapter alone as ``<run>-lora-F32.gguf`` in ``folder``, read back and
    checked; a format llama.cpp cannot hold is said and recorded, not an error."""
    from lorakit.rundir import read_json

    adapter_config = read_json(run.adapter / "adapter_config.json")
    reason = unsupported_reason(adapter_config) or unsupported_tensors(run.adapter)
    if reason is not None:
        say(f"no adapter GGUF: {reason}")
        return {"written": False, "reason": reason}
    path = folder / f"{run.path.name}-lora-F32.gguf"
    info = write_adapter_gguf(run.adapter, adapter_config, config, path, f"{run.path.name} LoRA")
    check = check_adapter_gguf(path, run.adapter, adapter_config, config)
    say(f"adapter GGUF written ({path.name}, {info['modules']} modules, read back exactly)")
    return {"written": True, "file": path.name, **info, **check}
