"""A long raw-text document -> its chunks and their tokenized rows, tokenizing it about once.

The document's text is tokenized once (in pieces of a few kB, in one batch: the token spans
only guide the search), :class:`lorakit.data.chunking.ChunkPlanner` picks each chunk's end
from those spans, and one batched call per window of chunks checks the plan against the real
rendered token counts: each chunk fits (its tokenization is also its row), a prefix that ends
where the plan says the longest fit may start fits, and one a few tokens past the estimated
longest fit does not. Where the tokenizer's counts grow with the prefix this proves each chunk
is the one :func:`lorakit.data.chunking.chunk_text` would cut; a check that fails (an estimate
off by more than the margin, or a tokenizer whose counts do not grow) hands that chunk to
:func:`lorakit.data.chunking.next_chunk_end`, today's search, and the plan goes on after it.
"""

from __future__ import annotations

import bisect
import itertools
from array import array
from collections.abc import Iterator
from typing import Any

import attrs

from lorakit.contracts import Example, Rendered
from lorakit.data.chunking import ChunkPlanner, marks_of, next_chunk_end
from lorakit.data.tokenize import (
    Tokenized,
    count_tokens,
    encode_with_offsets,
    token_ids,
    tokenize_batch,
)

PIECE = 4096  # characters of text per piece when the whole document is tokenized for spans
WINDOW = 8  # chunks planned and checked per batched tokenizer call (a plan that fails its check
# discards the window's later plans: 16 wasted 7% of the chunks' tokenization, 8 wastes 3%)


def _pieces(text: str) -> Iterator[tuple[int, int]]:
    """Consecutive ``(start, end)`` pieces of about ``PIECE`` characters, ending after a line
    break where one is near (so tokens rarely straddle a seam)."""
    pos, n = 0, len(text)
    while pos < n:
        cut = text.find("\n", pos + PIECE, pos + 4 * PIECE)
        end = n if pos + PIECE >= n else (cut + 1 if cut >= 0 else pos + PIECE)
        yield pos, end
        pos = end


_LENGTHS: dict[int, tuple[Any, list[int]]] = {}  # id(backend) -> (backend, lengths)


def byte_level_lengths(tokenizer: Any) -> list[int] | None:
    """Characters each token id spells in ASCII text, for a byte-level BPE tokenizer without a
    normalizer (its token strings have one character per byte); None for other tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        backend is None
        or not hasattr(backend, "get_vocab")
        or getattr(backend, "normalizer", None) is not None
        or type(getattr(backend, "decoder", None)).__name__ != "ByteLevel"
    ):
        return None
    if id(backend) not in _LENGTHS:  # the backend is kept, so its id is never reused
        vocab = backend.get_vocab(with_added_tokens=True)
        lengths = [0] * (max(vocab.values(), default=-1) + 1)
        for token, i in vocab.items():
            lengths[i] = len(token)
        _LENGTHS[id(backend)] = (backend, lengths)
    return _LENGTHS[id(backend)][1]


def token_spans(text: str, tokenizer: Any) -> tuple[array, array]:
    """Start and end characters of ``text``'s tokens, tokenized in pieces (batched).

    They only guide the chunk planner (its checks use the real tokenizer), so with a
    byte-level tokenizer an ASCII piece's spans are its tokens' lengths laid end to end,
    tokenized without offsets (cheaper; the same spans on such text); other pieces use the
    tokenizer's offsets."""
    starts, ends = array("l"), array("l")
    lengths = byte_level_lengths(tokenizer)
    pieces = list(_pieces(text))
    for i in range(0, len(pieces), 256):
        group = pieces[i : i + 256]
        texts = [text[a:b] for a, b in group]
        ascii_ = [lengths is not None and t.isascii() for t in texts]
        plain = iter(token_ids([t for t, a in zip(texts, ascii_, strict=True) if a], tokenizer))
        other = [t for t, a in zip(texts, ascii_, strict=True) if not a]
        offsets = iter(encode_with_offsets(other, tokenizer)[1] if other else [])
        for (base, _), is_ascii in zip(group, ascii_, strict=True):
            if is_ascii and lengths is not None:
                bounds = array(
                    "l", itertools.accumulate(map(lengths.__getitem__, next(plain)), initial=base)
                )
                starts.extend(bounds[:-1])
                ends.extend(bounds[1:])
                continue
            spans = next(offsets)
            starts.extend(base + s for s, _ in spans)
            ends.extend(base + e for _, e in spans)
    return starts, ends


def chunk_document(
    ex: Example, formatter: Any, tokenizer: Any, max_length: int
) -> tuple[list[str], list[Tokenized], list[Rendered]]:
    """``ex.text`` cut into the chunks :func:`lorakit.data.chunking.chunk_text` cuts, with each
    chunk's rendered form (``ex`` with the chunk's text) and its row. One piece when the whole
    text fits. Raises ``ValueError`` when even a single character does not fit."""
    text = ex.text or ""

    def render(piece: str) -> Rendered:
        return formatter.render(attrs.evolve(ex, text=piece), tokenizer)

    def fits(piece: str) -> bool:
        return count_tokens([render(piece).text], tokenizer)[0] <= max_length

    budget = max_length - count_tokens([render("").text], tokenizer)[0]
    starts, ends = token_spans(text, tokenizer)
    planner = ChunkPlanner(text, starts, ends, budget)
    pieces: list[str] = []
    rows: list[Tokenized] = []
    shown: list[Rendered] = []
    start = 0
    while start < len(text):
        plans = planner.plan(start, WINDOW)
        rendered = [render(text[p.start : p.end]) for p in plans]
        finals = tokenize_batch(rendered, tokenizer)
        asks = [(k, p.at_least, True) for k, p in enumerate(plans) if p.at_least != p.end]
        asks += [(k, p.below, False) for k, p in enumerate(plans) if p.below]
        counts = count_tokens(
            [render(text[plans[k].start : b]).text for k, b, _ in asks], tokenizer
        )
        bad = {
            k
            for (k, _, must_fit), c in zip(asks, counts, strict=True)
            if (c <= max_length) != must_fit
        }
        bad.update(k for k, row in enumerate(finals) if len(row.input_ids) > max_length)
        good = min(bad, default=len(plans))
        for k in range(good):
            pieces.append(text[plans[k].start : plans[k].end])
            rows.append(finals[k])
            shown.append(rendered[k])
        start = plans[good - 1].end if good else start
        if good < len(plans):  # the plan is off here: today's search cuts this chunk
            # the token ends around this chunk guide the search (any marks give the same cut)
            first = bisect.bisect_right(ends, start)
            marks = marks_of(text, ends[first : first + 4 * max(1, budget) + 64])
            end, _ = next_chunk_end(text, fits, marks, start, max(1, budget))
            shown.append(render(text[start:end]))
            pieces.append(text[start:end])
            rows += tokenize_batch(shown[-1:], tokenizer)
            start = end
    return pieces, rows, shown
