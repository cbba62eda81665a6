"""Token-level lint for ``lorakit check``: lengths, drops, supervised share, end-of-turn.

Works with any tokenizer that the formatters accept, including the torch-free
:class:`lorakit.data.lite_tokenizer.LiteTokenizer`, and goes through the same functions as
``lorakit run`` (:func:`iter_tokenized`, :func:`apply_overlength`), so what it reports is
what training sees. Each split is linted apart, so a drop says which split it comes from, as
``run``'s data report does; the supervised share is that of the training rows as trained. Rows
are counted a batch at a time and not kept: memory holds four bytes a row (its length),
whatever the data set's size.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from lorakit.contracts import SPLITS, Example
from lorakit.data.report import DataReport
from lorakit.data.rows import apply_overlength, iter_tokenized
from lorakit.data.tokenize import IGNORE_INDEX, Tokenized
from lorakit.errors import printable

GREEN, RESET = "\x1b[32;1m", "\x1b[0m"
OPEN, CLOSE = "[[", "]]"


@attrs.define
class LintStats:
    examples: int = 0
    lengths: array = attrs.field(factory=lambda: array("i"))  # every split's, as rendered
    over_length: Counter[str] = attrs.field(factory=Counter)  # split -> examples over the limit
    no_supervised: list[str] = attrs.field(factory=list)  # the first few example ids
    no_supervised_count: int = 0
    supervised_tokens: int = 0  # in every row as rendered, before the overlength policy
    total_tokens: int = 0
    kept: Counter[str] = attrs.field(factory=Counter)  # split -> rows the policy keeps
    trained_supervised: int = 0  # in the train split's rows as trained (after the policy)
    trained_tokens: int = 0
    eot: str = ""
    eot_tokens: int = 0
    turns: int = 0  # assistant turns + raw texts: places an end-of-turn should be learned
    eot_supervised: int = 0
    reports: dict[str, DataReport] = attrs.field(factory=dict)  # split -> its drops

    def lines(self, max_length: int, overlength: str) -> list[str]:
        if not self.lengths:
            return ["tokens: no examples"]
        s = sorted(self.lengths)
        pct = s[min(len(s) - 1, int(0.95 * len(s)))]
        splits = [name for name in SPLITS if name in self.reports]
        out = [
            f"tokens per example: min {s[0]}, median {s[len(s) // 2]}, p95 {pct}, max {s[-1]}"
            f" (train.max_length {max_length}; every split, before the overlength policy)",
        ]
        chunked = [r.chunked for r in self.reports.values() if r.chunked]
        if chunked:
            out.append(
                f"chunked {sum(map(len, chunked))} long documents into "
                f"{sum(sum(c.values()) for c in chunked)} pieces (never truncated)"
            )
        if sum(self.over_length.values()):
            what = {
                "drop": "dropped",
                "truncate": "truncated (or dropped if no answer is left)",
                "error": "an error: `lorakit run` would stop",
            }[overlength]
            out.append(
                f"{sum(self.over_length.values())} examples longer than {max_length} tokens: "
                f'{what} ([data] overlength = "{overlength}"; {_per_split(self.over_length)})'
            )
        for name in splits:
            report = self.reports[name]
            for reason, n in sorted(report.dropped.items()):
                out.append(f"would drop {n} examples: {reason} ({name} split)")
            special = report.special_text_warning()
            if special:
                out.append(f"warning: {name} split: {special}")
            if report.truncated:
                out.append(f"would truncate {report.truncated} examples ({name} split)")
        share = self.trained_supervised / self.trained_tokens if self.trained_tokens else 0.0
        out.append(
            f"supervised tokens: {self.trained_supervised} of {self.trained_tokens} "
            f"({100 * share:.1f}%) in the {self.kept['train']} training rows as trained "
            "(after the drops and truncation above)"
        )
        if self.no_supervised_count:
            ids = ", ".join(self.no_supervised[:5]) + (
                " ..." if self.no_supervised_count > 5 else ""
            )
            out.append(f"{self.no_supervised_count} examples have no supervised token: {ids}")
        if self.eot_tokens != 1:
            out.append(f"end-of-turn {self.eot!r} is {self.eot_tokens} tokens (expected 1)")
        else:
            ok = "ok" if self.eot_supervised >= self.turns else "MISSING in some"
            out.append(
                f"end-of-turn {self.eot!r} supervised {self.eot_supervised} times for "
                f"{self.turns} replies/texts ({ok})"
            )
        return out


def _per_split(counts: Counter[str]) -> str:
    return ", ".join(f"{name} {counts[name]}" for name in SPLITS if counts[name])


def lint(
    examples: Iterable[Example],
    formatter: Any,
    tokenizer: Any,
    max_length: int,
    overlength: str,
    split: str = "train",
    stats: LintStats | None = None,
) -> LintStats:
    """The statistics of ``examples``, the rows of ``split``, added to ``stats`` (one lint of
    all the splits) or to new statistics."""
    stats = stats if stats is not None else LintStats()
    report = stats.reports.setdefault(split, DataReport())
    stats.eot = formatter.end_of_turn(tokenizer)
    eot_ids = tokenizer(stats.eot, add_special_tokens=False)["input_ids"]
    stats.eot_tokens = len(eot_ids)
    policy = "drop" if overlength == "error" else overlength
    for pieces, rows in iter_tokenized(examples, formatter, tokenizer, max_length, report):
        for ex, row in zip(pieces, rows, strict=True):
            n = len(row.input_ids)
            stats.lengths.append(n)
            stats.total_tokens += n
            sup = row.n_supervised
            stats.supervised_tokens += sup
            if sup == 0:
                stats.no_supervised_count += 1
                if len(stats.no_supervised) < 6:
                    stats.no_supervised.append(ex.id)
            if n > max_length:
                stats.over_length[split] += 1
            if ex.messages is None:
                stats.turns += 1
            else:
                stats.turns += sum(m.role == "assistant" for m in ex.messages)
            if len(eot_ids) == 1:
                stats.eot_supervised += row.labels.count(eot_ids[0])
        kept = apply_overlength(pieces, rows, max_length, policy, report)
        stats.kept[split] += len(kept)
        if split == "train":
            stats.trained_tokens += sum(len(r.input_ids) for r in kept)
            stats.trained_supervised += sum(r.n_supervised for r in kept)
    stats.examples = len(stats.lengths)
    return stats


def mark_supervised(
    text: str, row: Tokenized, offsets: Sequence[tuple[int, int]], color: bool
) -> str:
    """The rendered text with supervised token spans wrapped in markers (or green when color)."""
    start_mark, end_mark = (GREEN, RESET) if color else (OPEN, CLOSE)
    flags = bytearray(len(text))
    for label, (s, e) in zip(row.labels, offsets, strict=True):
        if label != IGNORE_INDEX:
            flags[s:e] = b"\x01" * (e - s)
    out: list[str] = []
    inside = False
    for ch, flag in zip(text, flags, strict=True):
        if bool(flag) != inside:
            out.append(start_mark if flag else end_mark)
            inside = bool(flag)
        out.append(printable(ch))  # the data's own escape sequences are shown, not run
    if inside:
        out.append(end_mark)
    return "".join(out)


def show(examples: Sequence[Example], formatter: Any, tokenizer: Any, color: bool) -> list[str]:
    """Each example rendered, with what the loss is computed on marked."""
    from lorakit.data.tokenize import _char_mask, labels_for

    blocks = []
    for ex in examples:
        rendered = formatter.render(ex, tokenizer)
        enc = tokenizer([rendered.text], add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"][0], enc["offset_mapping"][0]
        row = Tokenized(list(ids), labels_for(ids, offsets, _char_mask(rendered)))
        head = f"--- {printable(ex.id)} ({len(ids)} tokens, {row.n_supervised} supervised)"
        blocks.append(head + "\n" + mark_supervised(rendered.text, row, offsets, color))
    return blocks
