"""Device and dtype choices, kept in one place (imports torch lazily)."""

from __future__ import annotations

from typing import Any


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
    """fp32 on CPU (bf16 matmul is ~30x slower there), bf16 on GPUs that support it, else fp16."""
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def dtype_from_name(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return auto_compute_dtype(device)
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
