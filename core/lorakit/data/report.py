"""The data report (what was read, skipped, dropped, truncated, chunked) and the read context
the core hands to data sources."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import attrs

from lorakit.errors import DataError


def example_where(ex: Any) -> str:
    """Where an example came from, for an error: its record's place (file:line), else its
    source's description, else its id."""
    return str(ex.meta.get("location") or ex.meta.get("source") or ex.id)


@attrs.define
class DataReport:
    """Counts of what happened to the data; printed by check/prepare/run and saved in the run."""

    per_source: dict[str, int] = attrs.field(factory=dict)
    skipped: list[tuple[str, str]] = attrs.field(factory=list)  # (where, reason)
    dropped: Counter = attrs.field(factory=Counter)  # reason -> count
    truncated: int = 0
    chunked: dict[str, int] = attrs.field(factory=dict)  # document id -> number of chunks
    warnings: list[str] = attrs.field(factory=list)
    # Facts a source reported about what it read (``SourceContext.note``), per source label:
    # a Hugging Face dataset's fingerprint, revision and rows.
    sources_info: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    # raw texts that spell a special token (``special_text.py``): token -> examples, and the
    # first few examples' ids
    special_text: Counter = attrs.field(factory=Counter)
    special_text_ids: list[str] = attrs.field(factory=list)

    def note_special_text(self, token: str, example_id: str) -> None:
        self.special_text[token] += 1
        if len(self.special_text_ids) < 5:
            self.special_text_ids.append(example_id)

    def special_text_warning(self) -> str | None:
        if not self.special_text:
            return None
        n = sum(self.special_text.values())
        tokens = ", ".join(f"{t!r} in {k}" for t, k in self.special_text.most_common(4))
        more = " ..." if n > len(self.special_text_ids) else ""
        return (
            f"{n} raw-text example{'s spell' if n > 1 else ' spells'} the tokenizer's special "
            "tokens "
            f"({tokens}; {', '.join(self.special_text_ids)}{more}): they are trained as those "
            "control tokens, which is right for text already in a chat format and wrong for "
            "prose that mentions them (reword them there)"
        )

    def lines(self) -> list[str]:
        out = [f"source {name}: {n} examples" for name, n in self.per_source.items()]
        for name, facts in self.sources_info.items():
            out.append(f"source {name}: " + ", ".join(f"{k} {v}" for k, v in facts.items()))
        if self.skipped:
            out.append(f"skipped {len(self.skipped)} bad records:")
            out += [f"  {where}: {reason}" for where, reason in self.skipped[:20]]
            if len(self.skipped) > 20:
                out.append(f"  ... and {len(self.skipped) - 20} more")
        for reason, n in sorted(self.dropped.items()):
            out.append(f"dropped {n} examples: {reason}")
        if self.truncated:
            out.append(f"truncated {self.truncated} examples to train.max_length")
        if self.chunked:
            out.append(
                f"split {len(self.chunked)} long documents into {sum(self.chunked.values())} "
                "chunks that fit train.max_length"
            )
        out += [f"warning: {w}" for w in self.warnings]
        special = self.special_text_warning()
        if special:
            out.append(f"warning: {special}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "per_source": self.per_source,
            "skipped": [{"where": w, "reason": r} for w, r in self.skipped],
            "dropped": dict(self.dropped),
            "truncated": self.truncated,
            "chunked": dict(self.chunked),
            "warnings": [*self.warnings, *filter(None, [self.special_text_warning()])],
            **({"sources_info": self.sources_info} if self.sources_info else {}),
        }


@attrs.define
class ReadContext:
    """The :class:`lorakit.contracts.SourceContext` the core hands to data sources."""

    recipe_dir: Path
    on_error: str
    report: DataReport
    source: str = "source"  # the label of the source reading now ("0:hf_dataset")

    def note(self, key: str, value: Any) -> None:
        self.report.sources_info.setdefault(self.source, {})[key] = value

    def reject(self, reason: str, where: str, fix: str) -> None:
        if self.on_error == "skip":
            self.report.skipped.append((where, reason))
            return
        raise DataError(reason, where=where, fix=fix)
