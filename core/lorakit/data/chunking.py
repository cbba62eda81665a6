"""Split long raw-text documents into chunks that fit ``train.max_length`` tokens.

Sources have no tokenizer, so a source marks a raw-text example ``meta["chunkable"] = True``
(the ``markdown`` source does) and the pipeline chunks it at tokenization time, with the real
formatter and tokenizer: a chunk "fits" when its *rendered* form (BOS, text, end-of-turn) is at
most ``max_length`` tokens. Cuts prefer, in order: a heading, a blank line (paragraph), a line
break, a sentence end, a space; a cut anywhere is the last resort. Chunks are consecutive
slices, so they concatenate back into the original text exactly; nothing is truncated.

The rules are :func:`chunk_text` (with :func:`next_chunk_end`): find the longest fitting
prefix by asking ``fits`` (bracketing a guess from the token ends, then bisecting), then take the
coarsest cut that keeps half of it. The pipeline does not call it chunk by chunk: a
:class:`ChunkPlanner` applies the same rules to token counts taken from one tokenization of the
whole document, and says which two prefixes, checked with the real tokenizer, prove each planned
chunk is the one :func:`chunk_text` cuts (:mod:`lorakit.data.chunk_rows` checks them in batches
and falls back to :func:`next_chunk_end` where a check fails). Where token counts grow with the
prefix (true for BPE tokenizers in practice) both give the chunks bisecting over the whole
remainder gives.

All chunks of a document stay in the split the document was assigned to (splits are decided on
whole documents, before chunking), so no document leaks between train and eval.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

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


def marks_of(text: str, token_ends: Sequence[int] | None) -> list[int]:
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


def next_chunk_end(
    text: str, fits: Callable[[str], bool], marks: list[int], start: int, span: int = 1
) -> tuple[int, int]:
    """The end of the chunk that starts at ``start``, found by asking ``fits`` (today's rules,
    the reference): ``(end, span)``, ``end == len(text)`` when the rest fits; ``span`` is the
    number of marks in the longest fitting prefix (the next chunk's guess). ``marks``: from
    :func:`marks_of`. Raises ``ValueError`` when even a single character does not fit."""
    n = len(text)
    first = bisect.bisect_right(marks, start)  # index of the first mark after start
    lo, hi = _longest_fit(text, fits, marks, start, first, first + span - 1)
    if hi > n:
        return n, span
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
    return end, max(1, bisect.bisect_right(marks, lo, first) - first)


def chunk_text(
    text: str, fits: Callable[[str], bool], token_ends: Sequence[int] | None = None
) -> list[str]:
    """Cut ``text`` into consecutive pieces for which ``fits(piece)`` is true.

    ``token_ends``: the end offsets of ``text``'s tokens (tokenized whole), which make each
    chunk cost a few ``fits`` calls of its own length; without them every character is a
    candidate end (same result, a few more calls). Raises ``ValueError`` when even a single
    character does not fit. :class:`ChunkPlanner` gives the same chunks from one tokenization.
    """
    marks = marks_of(text, token_ends)
    pieces: list[str] = []
    start, span = 0, 1
    while start < len(text):
        end, span = next_chunk_end(text, fits, marks, start, span)
        pieces.append(text[start:end])
        start = end
    return pieces


# The heading level with its '#'s captured: a heading cut is only seen by a scan that ends after
# its '#'s and the space (the lookahead of ``_LEVELS[0]`` cannot look past the scan's end).
_PLAN_LEVELS = (re.compile(r"\n(?=(#{1,6})\s)"), *_LEVELS[1:])
MARGIN = 8  # tokens past the estimated longest fit that the "does not fit" check may reach


class Planned(NamedTuple):
    """A chunk ``text[start:end]`` and what proves it is today's chunk: with ``lo`` the end of
    the longest fitting prefix from ``start``, every ``lo`` in ``[at_least, below)`` picks
    ``end``, so ``fits(text[start:at_least])`` and not ``fits(text[start:below])`` make it
    exact (``below == 0``: the chunk is the whole rest, proven by ``fits`` on it alone)."""

    start: int
    end: int
    at_least: int
    below: int


class ChunkPlanner:
    """Chunk ends chosen from one tokenization of the whole text, with the checks that make
    them the same as :func:`chunk_text`'s (where token counts grow with the prefix).

    ``starts``/``ends``: the character spans of ``text``'s tokens (sorted; an estimate: the
    text may be tokenized in pieces); ``budget``: tokens a chunk's text may take (max_length
    less the format's own tokens). The longest fitting prefix is estimated by counting those
    tokens; then the cut rules are applied to it, and the range of prefix ends that leads to the
    same cut is computed from the text alone. Nothing here calls the tokenizer: the caller
    checks ``at_least`` and ``below`` (see :class:`Planned`) and falls back to
    :func:`next_chunk_end` where a check fails.
    """

    def __init__(self, text: str, starts: Sequence[int], ends: Sequence[int], budget: int):
        self.text, self.starts, self.ends, self.budget = text, starts, ends, budget
        self._s = self._limit = -1
        self._levels: dict[int, tuple[list[int], list[int]]] = {}

    def plan(self, start: int, count: int) -> list[Planned]:
        """Up to ``count`` consecutive chunks from ``start`` (fewer at the end of the text)."""
        out: list[Planned] = []
        while start < len(self.text) and len(out) < count:
            out.append(self._one(start))
            start = out[-1].end
        return out

    def _level(self, i: int) -> tuple[list[int], list[int]]:
        """Level ``i``'s cuts in ``text[s:limit]`` and where each becomes visible (sorted)."""
        if i not in self._levels:
            cuts, seen = [], []
            for m in _PLAN_LEVELS[i].finditer(self.text, self._s, self._limit):
                cuts.append(m.end())
                seen.append(m.end() + len(m.group(1)) + 1 if i == 0 else m.end())
            self._levels[i] = (cuts, seen)
        return self._levels[i]

    def _decide(self, lo: int) -> tuple[int, int]:
        """``(end, level)`` that :func:`next_chunk_end`'s cut rules pick for the longest fit
        ``lo`` (level 5: no cut, ``end == lo``)."""
        s = self._s
        for i in range(len(_PLAN_LEVELS)):
            cuts, seen = self._level(i)
            j = bisect.bisect_right(seen, lo)
            if j and cuts[j - 1] - s >= _KEEP * (lo - s):
                return cuts[j - 1], i
        return lo, len(_PLAN_LEVELS)

    def _one(self, s: int) -> Planned:
        n, starts, ends = len(self.text), self.starts, self.ends
        first = bisect.bisect_right(ends, s)  # the first token that ends after s
        last = first + max(0, self.budget)  # the first token past the budget
        if last >= len(starts):
            return Planned(s, n, n, 0)  # the estimate says the rest fits
        lo = max(s + 1, starts[last])  # estimated longest fitting prefix
        limit = ends[min(len(ends) - 1, last + MARGIN)]
        self._s, self._limit, self._levels = s, min(n, max(limit, lo + 1)), {}
        end, level = self._decide(lo)
        if level == len(_PLAN_LEVELS):  # a cut anywhere: the longest fit itself, exactly
            return Planned(s, end, end, end + 1)
        return Planned(s, end, self._at_least(lo, end, level), self._below(lo, end, level))

    def _at_least(self, lo: int, end: int, level: int) -> int:
        """The least longest-fit end from which up to ``lo`` the rules pick ``end``."""
        s = self._s
        cuts, seen = self._level(level)
        least = seen[bisect.bisect_left(cuts, end)]  # a heading needs its '#'s seen too
        for i in range(level):  # no coarser cut may qualify from ``least`` up to ``lo``
            cuts, seen = self._level(i)
            for j in range(bisect.bisect_right(seen, lo) - 1, -1, -1):
                nxt = seen[j + 1] - 1 if j + 1 < len(seen) else lo
                top = min(lo, 2 * cuts[j] - s, nxt)  # the last prefix end this cut would win
                if top < least:
                    break  # earlier cuts win only further down
                if seen[j] <= top:
                    least = top + 1
                    break
        return least

    def _below(self, lo: int, end: int, level: int) -> int:
        """The first prefix end after ``lo`` (up to the scan's limit) where the cut may change:
        nothing at ``level`` or coarser changes in between, so ``level`` keeps picking ``end``."""
        s, limit = self._s, self._limit
        marks: set[int] = set()
        for i in range(level + 1):
            cuts, seen = self._level(i)
            marks.update(seen[bisect.bisect_right(seen, lo) : bisect.bisect_right(seen, limit)])
            # a cut stops qualifying at 2c - s + 1
            lo_c = bisect.bisect_left(cuts, (lo + s) // 2)
            hi_c = bisect.bisect_right(cuts, (limit - 1 + s) // 2)
            marks.update(2 * c - s + 1 for c in cuts[lo_c:hi_c])
        for x in sorted(m for m in marks if lo < m <= limit):
            if self._decide(x) != (end, level):
                return x
        return limit
