"""Split long raw-text documents into chunks that fit ``train.max_length`` tokens.

Sources have no tokenizer, so a source marks a raw-text example ``meta["chunkable"] = True``
(the ``markdown`` source does) and the pipeline chunks it at tokenization time, with the real
formatter and tokenizer: a chunk "fits" when its *rendered* form (BOS, text, end-of-turn) is at
most ``max_length`` tokens. Cuts prefer, in order: a heading, a blank line (paragraph), a line
break, a sentence end, a space; a cut anywhere is the last resort. Chunks are consecutive
slices, so they concatenate back into the original text exactly; nothing is truncated.

Linear time: the document is tokenized once and the token end offsets (``marks``) say where the
longest fitting prefix of each chunk should end, from how many tokens the previous chunk held.
``fits`` is then asked only about prefixes of about one chunk's length (a handful of calls per
chunk, bracketing the guess and bisecting between two token ends), never about the rest of the
document. Where token counts grow with the prefix (true for BPE tokenizers in practice) the
chunks are the same as bisecting over the whole remainder.

All chunks of a document stay in the split the document was assigned to (splits are decided on
whole documents, before chunking), so no document leaks between train and eval.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence

# Positions where a cut may go (the chunk ends just before the match's end).
_LEVELS = (
    re.compile(r"\n(?=#{1,6}\s)"),  # before a heading
    re.compile(r"\n[ \t]*\n"),  # after a blank line
    re.compile(r"\n"),  # after a line break
    re.compile(r"[.!?]\s"),  # after a sentence end (and its space)
    re.compile(r"\s"),  # after a space
)
# A cut at a coarser boundary is taken if it keeps at least this share of the largest chunk.
_KEEP = 0.5


def _cuts(text: str, level: re.Pattern[str], start: int, limit: int) -> list[int]:
    return [m.end() for m in level.finditer(text, start, limit) if start < m.end() <= limit]


def _marks(text: str, token_ends: Sequence[int] | None) -> list[int]:
    """Sorted candidate end positions, ending with ``len(text)``: token ends, or every char."""
    n = len(text)
    if token_ends is None:
        return list(range(1, n + 1))
    marks = sorted({e for e in token_ends if 0 < e < n})
    marks.append(n)
    return marks


def _longest_fit(
    text: str, fits: Callable[[str], bool], marks: list[int], start: int, first: int, guess: int
) -> tuple[int, int]:
    """``(lo, hi)`` char positions: ``text[start:lo]`` fits (lo may be ``start``) and
    ``text[start:hi]`` does not; ``hi == len(text) + 1`` when the whole rest fits. ``first`` is
    the index of the first mark after ``start``; ``guess`` the mark the longest fit may end at.
    """
    last = len(marks) - 1

    def ok(i: int) -> bool:
        return fits(text[start : marks[i]])

    g = min(max(guess, first), last)
    step = 1
    if ok(g):
        lo_i = g
        while True:
            if lo_i == last:
                return len(text), len(text) + 1  # the whole rest fits
            nxt = min(lo_i + step, last)
            if not ok(nxt):
                hi_i = nxt
                break
            lo_i, step = nxt, step * 2
    else:
        hi_i = g
        while True:
            nxt = hi_i - step
            if nxt < first:
                lo_i = first - 1  # only the empty prefix is known to fit
                break
            if ok(nxt):
                lo_i = nxt
                break
            hi_i, step = nxt, step * 2
    while hi_i - lo_i > 1:  # bisect between marks
        mid = (lo_i + hi_i) // 2
        if ok(mid):
            lo_i = mid
        else:
            hi_i = mid
    lo = marks[lo_i] if lo_i >= first else start
    hi = marks[hi_i]
    while hi - lo > 1:  # bisect between characters
        mid = (lo + hi) // 2
        if fits(text[start:mid]):
            lo = mid
        else:
            hi = mid
    return lo, hi


def chunk_text(
    text: str, fits: Callable[[str], bool], token_ends: Sequence[int] | None = None
) -> list[str]:
    """Cut ``text`` into consecutive pieces for which ``fits(piece)`` is true.

    ``token_ends``: the end offsets of ``text``'s tokens (tokenized whole), which make each
    chunk cost a few ``fits`` calls of its own length; without them every character is a
    candidate end (same result, a few more calls). Raises ``ValueError`` when even a single
    character does not fit.
    """
    marks = _marks(text, token_ends)
    pieces: list[str] = []
    start = 0
    first = 0  # index of the first mark after start
    span = 1  # marks in the previous chunk's longest fitting prefix: the next guess
    n = len(text)
    while start < n:
        lo, hi = _longest_fit(text, fits, marks, start, first, first + span - 1)
        if hi > n:
            pieces.append(text[start:])
            break
        if lo == start:
            raise ValueError(f"a single character at offset {start} does not fit")
        end = lo
        for level in _LEVELS:
            cuts = _cuts(text, level, start, lo)
            good = [c for c in reversed(cuts) if c - start >= _KEEP * (lo - start)]
            found = next((c for c in good if fits(text[start:c])), None)
            if found is not None:
                end = found
                break
        pieces.append(text[start:end])
        span = max(1, bisect.bisect_right(marks, lo, first) - first)
        first = bisect.bisect_right(marks, end, first)
        start = end
    return pieces
