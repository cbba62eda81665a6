"""Batched decoding that stops at the chat template's end-of-turn.

Prompts are left-padded so every row's next token sits at the same position; greedy by
default, or sampling with temperature/top_p. A row is finished when it emits any stop token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from lorakit.progress import bar


@attrs.frozen
class Generation:
    text: str  # decoded completion, without the stop token
    stopped: bool  # ended with a stop token within max_new_tokens
    n_tokens: int


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[Generation]:
    """Complete each rendered prompt (already in the chat format, special tokens included)."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[Generation] = []
    stops = set(stop_ids)
    try:
        model.eval()
        for start in bar(range(0, len(prompts), batch_size), desc="generating", unit="batch"):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(
                device
            )
            kwargs: dict[str, Any] = {
                "max_new_tokens": max_new_tokens,
                "eos_token_id": list(stop_ids),
                "pad_token_id": tokenizer.pad_token_id,
                "do_sample": do_sample,
            }
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p)
            else:
                # Explicit greedy: a saved generation_config must not switch sampling on.
                kwargs.update(temperature=None, top_p=None, top_k=None)
            with torch.inference_mode():
                seqs = model.generate(**enc, **kwargs)
            new = seqs[:, enc["input_ids"].shape[1] :].tolist()
            for row in new:
                cut = next((i for i, t in enumerate(row) if t in stops), None)
                body = row if cut is None else row[:cut]
                out.append(
                    Generation(
                        text=tokenizer.decode(body, skip_special_tokens=True),
                        stopped=cut is not None,
                        n_tokens=len(body) + (0 if cut is None else 1),
                    )
                )
    finally:
        tokenizer.padding_side = old_side
    return out
