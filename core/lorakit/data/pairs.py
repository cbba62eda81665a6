"""Preference pairs -> tokenized chosen and rejected rows, with every drop counted.

Each side is the whole conversation (the shared prompt, then the chosen or the rejected
answer), rendered by the recipe's formatter and tokenized in one call like an SFT example, so
its prompt tokens are exactly the ones the model sees at inference. Only the final answer is
supervised: the log-probabilities a preference loss compares are those of the two answers,
never of earlier assistant turns in the prompt.

A pair is kept whole or dropped whole: a side longer than ``train.max_length`` drops the pair
(counted; ``overlength = "error"`` stops instead), it is never cut, since cutting one answer
short changes which one is preferred.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from lorakit.contracts import Example, Rendered, Segment
from lorakit.data.report import DataReport, example_where
from lorakit.data.special_text import check_special_text
from lorakit.data.tokenize import Tokenized, tokenize_batch
from lorakit.errors import DataError
from lorakit.progress import bar

BATCH = 512


@attrs.frozen
class PairRow:
    """One pair's two sides, each labelled only on its final answer."""

    chosen: Tokenized
    rejected: Tokenized

    @property
    def length(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def final_answer_only(rendered: Rendered) -> Rendered:
    """``rendered`` with only its last run of supervised segments (the final assistant turn
    and its end-of-turn) left supervised."""
    segs = rendered.segments
    marked = [i for i, s in enumerate(segs) if s.supervised]
    if not marked:
        return rendered
    start = marked[-1]
    while start > 0 and segs[start - 1].supervised:
        start -= 1
    return Rendered(tuple(Segment(s.text, s.supervised and i >= start) for i, s in enumerate(segs)))


def tokenize_pairs(
    examples: Iterable[Example],
    formatter: Any,
    tokenizer: Any,
    max_length: int,
    overlength: str,
    report: DataReport,
) -> list[PairRow]:
    """Both sides of every pair, rendered and tokenized; pairs over ``max_length`` dropped and
    counted in ``report`` (or a ``DataError`` with ``overlength = "error"``). An example
    without a rejected side is a ``DataError``: a preference objective needs pairs."""
    kept: list[PairRow] = []
    it = iter(bar(examples, desc="formatting pairs", unit="pair"))
    while chunk := list(itertools.islice(it, BATCH)):
        for ex in chunk:
            if ex.rejected is None:
                raise DataError(
                    f"example {ex.id!r} is not a preference pair (it has no rejected answer)",
                    where=example_where(ex),
                    fix="a preference objective trains on pairs: read them with plugin = "
                    '"preference_jsonl", or set train.objective = "sft"',
                )
        check_special_text(chunk, tokenizer, report)
        chosen = tokenize_batch(
            [final_answer_only(formatter.render(ex, tokenizer)) for ex in chunk], tokenizer
        )
        rejected = tokenize_batch(
            [
                final_answer_only(
                    formatter.render(attrs.evolve(ex, messages=ex.rejected_messages), tokenizer)
                )
                for ex in chunk
            ],
            tokenizer,
        )
        for ex, c, r in zip(chunk, chosen, rejected, strict=True):
            if not c.n_supervised or not r.n_supervised:
                report.dropped["pair: a side with no supervised token"] += 1
                continue
            longest = max(len(c.input_ids), len(r.input_ids))
            if longest > max_length:
                if overlength == "error":
                    raise DataError(
                        f"pair {ex.id!r} has a side of {longest} tokens, over "
                        f"train.max_length={max_length}",
                        where=example_where(ex),
                        fix="raise [train].max_length, shorten the pair, or set [data] "
                        'overlength = "drop"',
                    )
                report.dropped[f"pair longer than train.max_length={max_length}"] += 1
                continue
            kept.append(PairRow(c, r))
    return kept


def pair_lines(rows: Sequence[PairRow], label: str) -> list[str]:
    """What ``lorakit check`` prints about a split's pairs: count, answer and row lengths."""
    if not rows:
        return [f"{label}: 0 pairs"]

    def stats(values: list[int]) -> str:
        return f"mean {statistics.fmean(values):.1f}, max {max(values)}"

    chosen = [r.chosen.n_supervised for r in rows]
    rejected = [r.rejected.n_supervised for r in rows]
    longer = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    return [
        f"{label}: {len(rows)} pairs; tokens per pair (both sides) "
        f"{stats([r.length for r in rows])}",
        f"  chosen answers {stats(chosen)} tokens, rejected answers {stats(rejected)} tokens; "
        f"chosen is the longer answer in {100 * longer / len(rows):.0f}% of pairs",
    ]
