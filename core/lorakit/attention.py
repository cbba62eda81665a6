"""Attention over packed rows: each example attends only to itself, with no mask in memory.

transformers lets a model's attention be swapped by name (``AttentionInterface``). lorakit
registers ``lorakit_varlen``: the packed row is cut at the example boundaries that the packing
collator passes along (``cu_seq_lens_q``) and each piece goes through PyTorch's
``scaled_dot_product_attention`` with ``is_causal=True`` (in a bf16 run, examples of 96 to 640
tokens, and from 384 to 2048, go through :mod:`lorakit.math_attention` instead: batched matmuls in bf16, long examples
a block of queries at a time, faster there than the kernel; a CPU QLoRA model's fp32 q, k and v are rounded to bf16 first where its
4-bit layers compute in bf16, :func:`matmul_dtype`). Compared with one block-diagonal mask
over the whole row this costs sum(L_i^2) instead of (sum L_i)^2 and never builds a T x T mask.
That loop is for CPUs. On a GPU a call per example and layer costs more in launches and host
syncs than the attention itself (SmolLM2-135M on an H100, separate runs of
``benchmarks/gpu_paths.py``, same recipe and window: 1.10 s a step with the loop, 0.36 s with one
call per layer), so there each layer makes one call: PyTorch's flash varlen kernel
(``torch.nn.attention.varlen``: bf16/fp16, no attention dropout, Ampere or newer, head size up
to 256), else one SDPA call with a block-diagonal causal mask built on the GPU. With the ``flash_attn`` package on CUDA,
:func:`choose` prefers transformers' own ``flash_attention_2``, which reads the same
``cu_seq_lens_*`` arguments.

No mask function is registered for the name, so transformers builds no mask at all; the function
refuses what it cannot do right (no boundaries, a KV cache, soft-capping, a sliding window
shorter than an example) rather than attend wrongly. Training switches it on only around
``trainer.train()`` and loss scoring (:func:`packed_attention`), never for generation.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

NAME = "lorakit_varlen"
_registered = False


def varlen_sdpa(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: Any = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """``query`` is ``[1, heads, T, dim]``; returns ``[1, T, heads, dim]`` like transformers' SDPA.

    Refuses what it would get wrong rather than attend wrongly: a call without example
    boundaries (no mask exists for this implementation), keys longer than the queries (a KV
    cache: generation), logit soft-capping, sinks or position biases it does not implement, and a
    sliding window shorter than an example.
    """
    low = matmul_dtype(module, query) or query.dtype  # .to() of the same dtype: no copy
    out, _ = _varlen_sdpa(
        module,
        query.to(low),
        key.to(low),
        value.to(low),
        dropout,
        scaling,
        cu_seq_lens_q,
        sliding_window,
        softcap,
        **kwargs,
    )
    return out.to(query.dtype), None


def matmul_dtype(module: Any, query: Any) -> Any:
    """The dtype a CPU QLoRA model's attention computes in: the compute dtype of its 4-bit
    projections where that is bf16 and the activations are fp32, else None (attention in the
    activations' dtype).

    In QLoRA only the 4-bit layers' matmuls run in the compute dtype; the residual stream, the
    norms and the LoRA weights stay fp32. On a CPU with fast bf16 an fp32 attention would then
    be most of the difference between a QLoRA step and a LoRA step (docs/performance.md), so
    the attention's matmuls follow the projections': q, k and v rounded to bf16 once, as a LoRA
    run's are, and the output back to fp32. Examples that a bf16 LoRA run attends in fp32
    (under ``math_attention.MIN_KEYS`` tokens) are attended in fp32 here too, from the rounded
    values: the same numbers as in LoRA, not a speed-up.
    """
    import torch

    if query.dtype != torch.float32 or query.device.type != "cpu":
        return None
    from lorakit.fused_lora import bf16_4bit_layer

    # q_proj in Llama, Mistral, Qwen, Gemma, OLMo; q, k and v as one qkv_proj in Phi-3
    proj = getattr(module, "q_proj", None) or getattr(module, "qkv_proj", None)
    return torch.bfloat16 if bf16_4bit_layer(proj) else None


def _varlen_sdpa(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    dropout: float,
    scaling: float | None,
    cu_seq_lens_q: Any,
    sliding_window: int | None,
    softcap: float | None,
    **kwargs: Any,
) -> tuple[Any, None]:
    import torch

    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise RuntimeError(f"{NAME} attention needs one packed row with cu_seq_lens_q")
    if key.shape[2] != query.shape[2]:
        raise RuntimeError(f"{NAME} attention is for training rows, not cached generation")
    unsupported = [k for k in ("s_aux", "position_bias") if kwargs.get(k) is not None]
    if softcap is not None:
        unsupported.append("softcap")
    if unsupported:
        raise RuntimeError(f"{NAME} attention does not implement {', '.join(unsupported)}")
    pair_prompts = kwargs.get("pair_prompt_lens")
    row_prefix = kwargs.get("row_prefix_len")
    if row_prefix is not None:  # lorakit.prefix_sharing: a prefix the row's examples share
        if query.is_cuda:
            raise RuntimeError(f"{NAME} attention shares a row's prefix on CPU only")
        return _row_prefix(
            query,
            key,
            value,
            cu_seq_lens_q,
            row_prefix,
            pair_prompts,
            module,
            dropout,
            scaling,
            sliding_window,
        )
    if pair_prompts is not None:
        if query.is_cuda:
            raise RuntimeError(f"{NAME} attention shares pair prompts on CPU only")
        return _pairs_sharing_prompts(
            query, key, value, cu_seq_lens_q, pair_prompts, module, dropout, scaling, sliding_window
        )
    if query.is_cuda:
        # one kernel call per layer, not one per example: the per-example loop below is what
        # makes sense on a CPU, but on a GPU its launches (and the sync of reading the
        # boundaries) cost far more than the attention itself
        return _packed_one_call(
            query,
            key,
            value,
            cu_seq_lens_q,
            p_drop(module, dropout),
            scaling,
            sliding_window,
            kwargs.get("max_length_q"),
        )
    bounds = cu_seq_lens_q.tolist()
    if bounds[0] != 0 or bounds[-1] != query.shape[2]:
        raise RuntimeError(f"{NAME} attention: the example boundaries do not cover the row")
    if (
        sliding_window is not None
        and max(b - a for a, b in itertools.pairwise(bounds)) > sliding_window
    ):
        raise _window_error(sliding_window)
    gqa = key.shape[1] != query.shape[1]
    p = p_drop(module, dropout)
    # split, not slices: the backward of a split is one concatenation, while each slice's
    # backward writes its piece into a zero tensor of the whole row and adds those up
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    pieces = [
        _causal_sdpa(q, k, v, p, scaling, gqa, row=cu_seq_lens_q)
        for q, k, v in zip(
            query.split(lengths, dim=2),
            key.split(lengths, dim=2),
            value.split(lengths, dim=2),
            strict=True,
        )
    ]
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _pairs_sharing_prompts(
    query: Any,
    key: Any,
    value: Any,
    cu: Any,
    prompt_lens: Any,
    module: Any,
    dropout: float,
    scaling: float | None,
    sliding_window: int | None,
) -> tuple[Any, None]:
    """Preference pairs packed with their prompt once (:func:`lorakit.preference.pack_pairs`):
    the row holds, per pair, ``prompt + chosen answer`` then ``rejected answer``
    (``cu``: two sequences per pair), and the rejected answer attends to the first
    ``prompt_lens[i]`` tokens of its pair and causally to itself, never to the chosen answer.
    One SDPA call per pair with that mask (a few hundred tokens: the mask is small)."""
    import torch

    bounds = cu.tolist()
    shared = prompt_lens.tolist()
    if len(bounds) != 2 * len(shared) + 1 or bounds[0] != 0 or bounds[-1] != query.shape[2]:
        raise RuntimeError(f"{NAME} attention: the pair boundaries do not cover the row")
    if sliding_window is not None:
        # the longest sequence: a chosen side, or a shared prompt and its rejected answer
        longest = max(
            max(bounds[2 * i + 1] - bounds[2 * i], n + bounds[2 * i + 2] - bounds[2 * i + 1])
            for i, n in enumerate(shared)
        )
        if longest > sliding_window:
            raise _window_error(sliding_window)
    gqa = key.shape[1] != query.shape[1]
    p = p_drop(module, dropout)
    lengths = [bounds[2 * i + 2] - bounds[2 * i] for i in range(len(shared))]
    pieces = []
    for q, k, v, n, first in zip(
        query.split(lengths, dim=2),
        key.split(lengths, dim=2),
        value.split(lengths, dim=2),
        shared,
        (bounds[2 * i + 1] - bounds[2 * i] for i in range(len(shared))),
        strict=True,
    ):
        pieces.append(_causal_sdpa(q, k, v, p, scaling, gqa, block=first, prompt=n, row=cu))
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _row_prefix(
    query: Any,
    key: Any,
    value: Any,
    cu: Any,
    prefix: Any,
    pair_prompts: Any,
    module: Any,
    dropout: float,
    scaling: float | None,
    sliding_window: int | None,
) -> tuple[Any, None]:
    """A row whose examples share their first ``prefix`` positions
    (:func:`lorakit.prefix_sharing.attend`)."""
    from lorakit.prefix_sharing import attend

    gqa = key.shape[1] != query.shape[1]
    p = p_drop(module, dropout)

    def sdpa(q: Any, k: Any, v: Any, block: int | None, prompt: int, context: int) -> Any:
        return _causal_sdpa(
            q, k, v, p, scaling, gqa, block=block, prompt=prompt, context=context, row=cu
        )

    bounds, n = cu.tolist(), int(prefix)
    prompts = None if pair_prompts is None else pair_prompts.tolist()
    if sliding_window is not None:  # the longest sequence as it would be whole
        seqs = [b - a for a, b in itertools.pairwise(bounds[1:])]
        if prompts is None:
            longest = n + max(seqs)
        else:
            longest = max(max(n + seqs[2 * i], p + seqs[2 * i + 1]) for i, p in enumerate(prompts))
        if longest > sliding_window:
            raise _window_error(sliding_window)
    out = attend(query, key, value, bounds, n, prompts, sdpa)
    return out.transpose(1, 2).contiguous(), None


def pair_mask(total: int, first: int, prompt: int, device: Any = None) -> Any:
    """The attention mask of one pair in a packed row (True: may attend): positions
    ``[0, first)`` are the first sequence (causal), the rest the second, which attends causally
    to itself and to the first ``prompt`` positions (its shared prompt; 0: none)."""
    import torch

    pos = torch.arange(total, device=device)
    causal = pos[:, None] >= pos[None, :]
    second = pos >= first
    same = second[:, None] == second[None, :]
    return causal & (same | (second[:, None] & (pos[None, :] < prompt)))


def _mask(q: Any, block: int | None, prompt: int, context: int) -> Any:
    """The mask :func:`_causal_sdpa` attends ``q``'s example with: None (plain causal: the
    kernel's own), a pair's, or either after ``context`` positions every query sees."""
    import torch

    mask = None if block is None else pair_mask(q.shape[2], block, prompt, q.device)
    if context:
        own = mask if mask is not None else pair_mask(q.shape[2], q.shape[2], 0, q.device)
        seen = torch.ones((q.shape[2], context), dtype=torch.bool, device=q.device)
        mask = torch.cat([seen, own], dim=1)
    return mask


def _math_bias(q: Any, block: int | None, prompt: int, context: int) -> Any:
    from lorakit import math_attention

    mask = _mask(q, block, prompt, context)
    if mask is None:
        mask = pair_mask(q.shape[2], q.shape[2], 0, q.device)
    return math_attention.mask_bias(mask, q.dtype)


class _RowMasks:
    """The masks of the last packed row's examples. Every layer attends the same examples
    with the same masks, so they are built in the first layer and reused by the others (and
    by the backward, which keeps one copy instead of one a layer). The row is known by its
    boundaries tensor, which transformers hands every layer as the same object; held weakly,
    so a new row (a new tensor) starts afresh, and the masks go when the row does. Masks are
    never written to."""

    def __init__(self) -> None:
        self._row: Any = None
        self._masks: dict[tuple[Any, ...], Any] = {}

    def get(self, row: Any, key: tuple[Any, ...], build: Any) -> Any:
        import weakref

        if row is None:
            return build()
        if self._row is None or self._row() is not row:
            self._row, self._masks = weakref.ref(row, self._forget), {}
        if key not in self._masks:
            self._masks[key] = build()
        return self._masks[key]

    def _forget(self, ref: Any) -> None:
        if ref is self._row:
            self._row, self._masks = None, {}


_ROW_MASKS = _RowMasks()


# PyTorch's CPU flash kernel is slower in bf16 than in fp32 for short sequences: forward and
# backward of one example, 9 heads of 64, on 2 AMX cores: 3.1 ms in bf16 against 1.4 ms in
# fp32 at 133 tokens, about equal at 300, 12.1 against 15.0 ms at 600. So a bf16 run's examples
# up to this length that the kernel takes (shorter than math_attention.MIN_KEYS) attend in fp32.
FP32_ATTENTION_MAX = 384


def _causal_sdpa(
    q: Any,
    k: Any,
    v: Any,
    p: float,
    scaling: float | None,
    gqa: bool,
    block: int | None = None,
    prompt: int = 0,
    context: int = 0,
    row: Any = None,
) -> Any:
    """Causal SDPA over one example; with ``block``, over one pair (:func:`pair_mask`); with
    ``context``, the keys and values open with that many positions (a shared prefix,
    :mod:`lorakit.prefix_sharing`) that every query sees. bf16 examples of the lengths
    :mod:`lorakit.math_attention` takes go there, with the same mask. ``row``: the packed row's
    boundaries tensor, the same object in every layer: its masks are built once
    (:class:`_RowMasks`)."""
    import torch
    import torch.nn.functional as F

    from lorakit import math_attention

    if math_attention.applies(q, k, p):
        key = (q.shape[2], block, prompt, context, q.device, q.dtype)
        bias = _ROW_MASKS.get(row, key, lambda: _math_bias(q, block, prompt, context))
        return math_attention.attention(q, k, v, None, scaling, bias=bias)
    mask = _ROW_MASKS.get(
        row,
        (q.shape[2], block, prompt, context, q.device),
        lambda: _mask(q, block, prompt, context),
    )
    dtype = q.dtype
    if dtype == torch.bfloat16 and k.shape[2] <= FP32_ATTENTION_MAX:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None, scale=scaling, enable_gqa=gqa
    )
    return out.to(dtype)


def p_drop(module: Any, dropout: float) -> float:
    return dropout if module.training else 0.0


def _window_error(sliding_window: int) -> Exception:
    from lorakit.errors import RunError

    return RunError(
        f"an example is longer than the model's sliding attention window of {sliding_window} "
        f"tokens, and lorakit's packed attention ({NAME}) has no sliding window",
        where="[train].max_length",
        fix=f"set train.max_length to at most {sliding_window}",
    )


def _packed_one_call(
    query: Any,
    key: Any,
    value: Any,
    cu: Any,
    dropout: float,
    scaling: float | None,
    sliding_window: int | None,
    longest: Any,
) -> tuple[Any, None]:
    """Packed attention on a GPU: PyTorch's flash varlen kernel where it applies, else one SDPA
    call with a block-diagonal causal mask (built on the GPU, no host sync)."""
    import torch
    import torch.nn.functional as F

    if not isinstance(longest, int):
        longest = int((cu[1:] - cu[:-1]).max())
    if sliding_window is not None and longest > sliding_window:
        raise _window_error(sliding_window)
    gqa = key.shape[1] != query.shape[1]
    kernel = varlen_kernel()
    if (
        kernel is not None
        and dropout == 0.0
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-1] <= 256
        and query.shape[-1] % 8 == 0
        and torch.cuda.get_device_capability(query.device) >= (8, 0)  # flash: Ampere or newer
    ):
        attend, causal = kernel
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, dim]
        if gqa:
            group = query.shape[1] // key.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        cu32 = cu.to(torch.int32)
        try:
            out = attend(q, k, v, cu32, cu32, longest, longest, scale=scaling, **causal)
            return out.unsqueeze(0), None
        except (TypeError, NotImplementedError):  # another signature in this PyTorch: the mask
            global _KERNEL
            _KERNEL = None
    total = query.shape[2]
    positions = torch.arange(total, device=query.device)
    example = torch.searchsorted(cu[1:].to(positions.dtype), positions, right=True)
    mask = (example[:, None] == example[None, :]) & (positions[:, None] >= positions[None, :])
    if gqa:
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


_KERNEL: Any = False  # not looked up yet


def varlen_kernel() -> tuple[Any, dict[str, Any]] | None:
    """``torch.nn.attention.varlen.varlen_attn`` (flash attention over cumulative lengths, in
    PyTorch since 2.10) and the keyword that makes it causal in this PyTorch, or None."""
    global _KERNEL
    if _KERNEL is False:
        _KERNEL = None
        try:
            import inspect

            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            return None
        params = inspect.signature(varlen_attn).parameters
        if "window_size" in params:
            _KERNEL = (varlen_attn, {"window_size": (-1, 0)})
        elif "is_causal" in params:
            _KERNEL = (varlen_attn, {"is_causal": True})
    return _KERNEL


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_sdpa)
    _registered = True


def choose(device: str) -> str:
    """The attention implementation for packed training rows on ``device``."""
    if device == "cuda":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    register()
    return NAME


def use_packed_attention(model: Any, device: str) -> str:
    """Switch ``model`` (a transformers model, possibly PEFT-wrapped) to packed-row attention."""
    from lorakit.errors import ModelError

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = choose(device)
    if not base._can_set_attn_implementation():
        raise ModelError(
            f"{type(base).__name__} does not let its attention be swapped, so lorakit cannot "
            "keep packed examples from attending to each other",
            where="[model]",
            fix="use a model class that follows transformers' AttentionInterface (Llama, Mistral, "
            "Qwen2, Phi-3 ...)",
        )
    base.set_attn_implementation(name)
    if base.config._attn_implementation != name:
        raise ModelError(f"{type(base).__name__} refused attention implementation {name!r}")
    return name


@contextlib.contextmanager
def packed_attention(model: Any, device: str) -> Iterator[None]:
    """Packed-row attention inside the block, the model's own implementation after it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    name = use_packed_attention(model, device)
    try:
        yield
    finally:
        if before != name:
            base.set_attn_implementation(before)
