"""Rendered text -> ``input_ids`` and completion-only ``labels``.

The whole rendered example is tokenized in one call (exactly as at inference), and each token is
supervised when its first character lies in a supervised segment. Tokenizing segment by segment
would merge differently at the seams; this way the prompt tokens are always a prefix of the
prompt+completion tokens, and labels line up with the real token boundaries.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any

import attrs

from lorakit.contracts import Rendered

IGNORE_INDEX = -100


@attrs.frozen
class Tokenized:
    """One example's token ids and labels. ``tokenize_batch`` stores them as ``array("i")``
    (4 bytes a token, not a Python list's ~36), which index, slice and iterate like lists."""

    input_ids: Sequence[int]
    labels: Sequence[int]

    @property
    def n_supervised(self) -> int:
        labels = self.labels
        if isinstance(labels, (array, list)):
            return len(labels) - labels.count(IGNORE_INDEX)
        return sum(1 for label in labels if label != IGNORE_INDEX)


def _char_mask(rendered: Rendered) -> bytes:
    """One byte per character of the rendered text: 1 where the character is supervised."""
    return b"".join(
        (b"\x01" if seg.supervised else b"\x00") * len(seg.text) for seg in rendered.segments
    )


def labels_for(ids: Sequence[int], offsets: Sequence[tuple[int, int]], mask: bytes) -> list[int]:
    """A token is supervised when its first character is (zero-width tokens: the one before)."""
    n = len(mask)
    return [
        tok if (p := (s if s < e else (s - 1 if s else 0))) < n and mask[p] else IGNORE_INDEX
        for tok, (s, e) in zip(ids, offsets, strict=True)
    ]


def tokenize_batch(rendered: Sequence[Rendered], tokenizer: Any) -> list[Tokenized]:
    """Tokenize many rendered examples at once (fast tokenizers batch this in Rust).

    Examples whose text is supervised throughout (a raw text without a BOS string) need no
    character offsets: each token's first character is supervised, so its label is its id.
    They are tokenized without offsets where the tokenizer can skip them (a long document's
    chunks are such texts)."""
    if not rendered:
        return []
    whole = [all(seg.supervised for seg in r.segments) for r in rendered]
    plain = [r.text for r, w in zip(rendered, whole, strict=True) if w]
    plain_ids = iter(token_ids(plain, tokenizer) if plain else [])
    masked = [r.text for r, w in zip(rendered, whole, strict=True) if not w]
    ids_list, offsets_list = encode_with_offsets(masked, tokenizer) if masked else ([], [])
    with_offsets = iter(zip(ids_list, offsets_list, strict=True))
    out = []
    for r, w in zip(rendered, whole, strict=True):
        if w:
            row = array("i", next(plain_ids))
            out.append(Tokenized(input_ids=row, labels=array("i", row)))
            continue
        ids, offsets = next(with_offsets)
        labels = labels_for(ids, offsets, _char_mask(r))
        out.append(Tokenized(input_ids=array("i", ids), labels=array("i", labels)))
    return out


def encode_with_offsets(texts: list[str], tokenizer: Any) -> tuple[list[list[int]], list[Any]]:
    """Token ids and character offsets, without special tokens.

    A transformers fast tokenizer is called through its Rust ``backend_tokenizer`` directly
    (same result, without the Python-side batch conversion that costs about 40% of the time)
    unless truncation or padding is configured on it.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        backend is not None
        and hasattr(backend, "encode_batch")
        and backend.truncation is None
        and backend.padding is None
    ):
        encs = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encs], [e.offsets for e in encs]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def token_ids(texts: list[str], tokenizer: Any) -> list[list[int]]:
    """The ids :func:`encode_with_offsets` gives, without computing offsets where the
    tokenizer can skip them (``encode_batch_fast``, about a third cheaper)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        backend is not None
        and hasattr(backend, "encode_batch_fast")
        and backend.truncation is None
        and backend.padding is None
    ):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    ids, _ = encode_with_offsets(texts, tokenizer)
    return ids


def count_tokens(texts: list[str], tokenizer: Any) -> list[int]:
    """How many tokens each text is (no special tokens), without offsets (:func:`token_ids`)."""
    return [len(i) for i in token_ids(texts, tokenizer)]
