"""Labelled answers (KTO) -> tokenized rows, one per answer, with every drop counted.

An answer is a conversation whose last assistant turn is labelled desirable or undesirable: an
unpaired example (``Example.label``), or either side of a preference pair (its chosen answer
desirable, its rejected one undesirable; the pair's two answers stay in one split, since the
pair was split whole). Each is rendered by the recipe's formatter and tokenized in one call,
like an SFT example, and only its final answer is supervised (:func:`final_answer_only`).

An answer longer than ``train.max_length`` is dropped and counted (``overlength = "error"``
stops instead), never cut: a cut answer is not the answer that was labelled.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from lorakit.contracts import Example
from lorakit.data.pairs import BATCH, final_answer_only
from lorakit.data.report import DataReport, example_where
from lorakit.data.special_text import check_special_text
from lorakit.data.tokenize import Tokenized, tokenize_batch
from lorakit.errors import DataError
from lorakit.progress import bar


@attrs.frozen
class AnswerRow:
    """One labelled answer: the whole conversation's tokens, only the answer supervised."""

    input_ids: Sequence[int]
    labels: Sequence[int]
    desirable: bool

    @property
    def n_supervised(self) -> int:
        return Tokenized(self.input_ids, self.labels).n_supervised

    @property
    def length(self) -> int:
        return len(self.input_ids)


def labelled_answers(ex: Example) -> list[tuple[Example, bool]]:
    """The labelled answers an example holds: itself (an unpaired answer), or a pair's chosen
    (desirable) and rejected (undesirable) conversations. A ``DataError`` for anything else."""
    if ex.label is not None:
        return [(ex, ex.label)]
    if ex.rejected is not None:
        rejected = attrs.evolve(ex, messages=ex.rejected_messages, rejected=None)
        return [(attrs.evolve(ex, rejected=None), True), (rejected, False)]
    raise DataError(
        f"example {ex.id!r} is neither a labelled answer nor a preference pair",
        where=example_where(ex),
        fix='kto trains on answers labelled desirable or undesirable: read {"prompt", '
        '"completion", "label"} records (or pairs) with plugin = "preference_jsonl", or set '
        'train.objective = "sft"',
    )


def tokenize_answers(
    examples: Iterable[Example],
    formatter: Any,
    tokenizer: Any,
    max_length: int,
    overlength: str,
    report: DataReport,
) -> list[AnswerRow]:
    """Every labelled answer, rendered and tokenized, in the order of ``examples`` (a pair's
    chosen answer, then its rejected one); answers over ``max_length`` dropped and counted in
    ``report`` (or a ``DataError`` with ``overlength = "error"``)."""
    kept: list[AnswerRow] = []
    it = iter(bar(examples, desc="formatting answers", unit="example"))
    while chunk := list(itertools.islice(it, BATCH)):
        check_special_text(chunk, tokenizer, report)
        answers = [a for ex in chunk for a in labelled_answers(ex)]
        rows = tokenize_batch(
            [final_answer_only(formatter.render(ex, tokenizer)) for ex, _ in answers], tokenizer
        )
        for (ex, desirable), row in zip(answers, rows, strict=True):
            if not row.n_supervised:
                report.dropped["answer: no supervised token"] += 1
                continue
            if len(row.input_ids) > max_length:
                if overlength == "error":
                    raise DataError(
                        f"answer {ex.id!r} is {len(row.input_ids)} tokens, over "
                        f"train.max_length={max_length}",
                        where=example_where(ex),
                        fix="raise [train].max_length, shorten the answer, or set [data] "
                        'overlength = "drop"',
                    )
                report.dropped[f"answer longer than train.max_length={max_length}"] += 1
                continue
            kept.append(AnswerRow(row.input_ids, row.labels, desirable))
    return kept


def answer_lines(rows: Sequence[AnswerRow], label: str) -> list[str]:
    """What ``lorakit check`` prints about a split's labelled answers: how many of each kind,
    answer and row lengths."""
    if not rows:
        return [f"{label}: 0 answers"]

    def stats(values: list[int]) -> str:
        return f"mean {statistics.fmean(values):.1f}, max {max(values)}" if values else "none"

    good = [r for r in rows if r.desirable]
    bad = [r for r in rows if not r.desirable]
    return [
        f"{label}: {len(rows)} answers ({len(good)} desirable, {len(bad)} undesirable); "
        f"tokens per answer (with its prompt) {stats([r.length for r in rows])}",
        f"  desirable answers {stats([r.n_supervised for r in good])} tokens, undesirable "
        f"answers {stats([r.n_supervised for r in bad])} tokens",
    ]


def weight_note(good: int, bad: int, desirable_weight: float, undesirable_weight: float) -> str:
    """Advice when the desirable and undesirable answers are unbalanced and neither weight is
    in the range the KTO paper recommends (its Eq. 8, as TRL's ``KTOTrainer`` warns):
    ``desirable_weight x good / (undesirable_weight x bad)`` in [1, 4/3]; "" otherwise."""
    if not good or not bad or good == bad:
        return ""
    d_low = round(bad * undesirable_weight / good, 2)
    d_high = round(bad * undesirable_weight / good * 1.33, 2)
    u_low = round(good * desirable_weight / bad / 1.33, 2)
    u_high = round(good * desirable_weight / bad, 2)
    if d_low <= desirable_weight <= d_high or u_low <= undesirable_weight <= u_high:
        return ""
    return (
        f"{good} desirable and {bad} undesirable training answers: the KTO paper recommends "
        f"EITHER train.desirable_weight in [{d_low}, {d_high}] OR train.undesirable_weight in "
        f"[{u_low}, {u_high}] (not both)"
    )
