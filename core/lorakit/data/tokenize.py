"""Rendered text -> ``input_ids`` and completion-only ``labels``.

The whole rendered example is tokenized in one call (exactly as at inference), and each token is
supervised when its first character lies in a supervised segment. Tokenizing segment by segment
would merge differently at the seams; this way the prompt tokens are always a prefix of the
prompt+completion tokens, and labels line up with the real token boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from lorakit.contracts import Rendered

IGNORE_INDEX = -100


@attrs.frozen
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _char_mask(rendered: Rendered) -> bytearray:
    mask = bytearray()
    for seg in rendered.segments:
        mask.extend((1 if seg.supervised else 0).to_bytes(1, "little") * len(seg.text))
    return mask


def tokenize_batch(rendered: Sequence[Rendered], tokenizer: Any) -> list[Tokenized]:
    """Tokenize many rendered examples at once (fast tokenizers batch this in Rust)."""
    if not rendered:
        return []
    texts = [r.text for r in rendered]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for r, ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"], strict=True):
        mask = _char_mask(r)
        labels = []
        for tok, (start, end) in zip(ids, offsets, strict=True):
            pos = start if start < end else max(start - 1, 0)
            sup = pos < len(mask) and mask[pos]
            labels.append(tok if sup else IGNORE_INDEX)
        out.append(Tokenized(input_ids=list(ids), labels=labels))
    return out


def tokenize_one(rendered: Rendered, tokenizer: Any) -> Tokenized:
    return tokenize_batch([rendered], tokenizer)[0]
