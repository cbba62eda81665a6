"""Split long raw-text documents into chunks that fit ``train.max_length`` tokens.

Sources have no tokenizer, so a source marks a raw-text example ``meta["chunkable"] = True``
(the ``markdown`` source does) and the pipeline chunks it at tokenization time, with the real
formatter and tokenizer: a chunk "fits" when its *rendered* form (BOS, text, end-of-turn) is at
most ``max_length`` tokens. Cuts prefer, in order: a heading, a blank line (paragraph), a line
break, a sentence end, a space; a cut anywhere is the last resort. Chunks are consecutive
slices, so they concatenate back into the original text exactly; nothing is truncated.

All chunks of a document stay in the split the document was assigned to (splits are decided on
whole documents, before chunking), so no document leaks between train and eval.
"""

from __future__ import annotations

import re
from collections.abc import Callable

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


def chunk_text(text: str, fits: Callable[[str], bool]) -> list[str]:
    """Cut ``text`` into consecutive pieces for which ``fits(piece)`` is true.

    Raises ``ValueError`` when even a single character does not fit.
    """
    pieces: list[str] = []
    start = 0
    n = len(text)
    while start < n:
        if fits(text[start:]):
            pieces.append(text[start:])
            break
        # The longest prefix that fits: binary search (token counts grow with the prefix).
        lo, hi = start, n  # text[start:lo] fits (or is empty), text[start:hi] does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(text[start:mid]):
                lo = mid
            else:
                hi = mid
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
        start = end
    return pieces
