"""Recipe -> examples -> splits -> tokenized rows, with every skip and drop counted.

``lorakit check``, ``prepare`` and ``run`` all go through here, so they agree on what is read,
which split each example lands in, and what is dropped and why.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from lorakit.contracts import Example
from lorakit.data.chunking import chunk_text
from lorakit.data.splits import assign_splits, fingerprint
from lorakit.data.tokenize import IGNORE_INDEX, Tokenized, encode_with_offsets, tokenize_batch
from lorakit.data.validate import checked_records
from lorakit.errors import DataError
from lorakit.progress import bar
from lorakit.sections import DataSection

if TYPE_CHECKING:
    from lorakit.components import SourceComponent


@attrs.define
class DataReport:
    """Counts of what happened to the data; printed by check/prepare/run and saved in the run."""

    per_source: dict[str, int] = attrs.field(factory=dict)
    skipped: list[tuple[str, str]] = attrs.field(factory=list)  # (where, reason)
    dropped: Counter = attrs.field(factory=Counter)  # reason -> count
    truncated: int = 0
    chunked: dict[str, int] = attrs.field(factory=dict)  # document id -> number of chunks
    warnings: list[str] = attrs.field(factory=list)

    def lines(self) -> list[str]:
        out = [f"source {name}: {n} examples" for name, n in self.per_source.items()]
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
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "per_source": self.per_source,
            "skipped": [{"where": w, "reason": r} for w, r in self.skipped],
            "dropped": dict(self.dropped),
            "truncated": self.truncated,
            "chunked": dict(self.chunked),
            "warnings": list(self.warnings),
        }


@attrs.define
class ReadContext:
    """The :class:`lorakit.contracts.SourceContext` the core hands to data sources."""

    recipe_dir: Path
    on_error: str
    report: DataReport

    def reject(self, reason: str, where: str, fix: str) -> None:
        if self.on_error == "skip":
            self.report.skipped.append((where, reason))
            return
        raise DataError(reason, where=where, fix=fix)


@attrs.frozen
class Splits:
    train: list[Example]
    val: list[Example]
    test: list[Example]

    def get(self, name: str) -> list[Example]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    @property
    def fingerprint(self) -> str:
        return fingerprint([*self.train, *self.val, *self.test])


def read_examples(
    sources: Sequence[SourceComponent], data: DataSection, recipe_dir: Path, report: DataReport
) -> list[Example]:
    """Read every built ``[[data.sources]]`` table (``components.sources``), in order, with
    relative paths under ``recipe_dir``. Duplicate ids are an error (or a skip, per
    ``data.on_error``).

    Every record a source yields is checked against the ``Example`` contract
    (:mod:`lorakit.data.validate`); a record that breaks it, or a source that fails with
    anything but a lorakit error, is a ``PluginError`` naming the plugin and the record.
    """
    ctx = ReadContext(recipe_dir=recipe_dir, on_error=data.on_error, report=report)
    examples: list[Example] = []
    seen: dict[str, str] = {}
    for i, part in enumerate(sources):
        label = f"{i}:{part.name}"
        count = 0
        for ex in bar(
            checked_records(part.source.read, ctx, part.entry, part.key),
            desc=f"reading {part.name}",
            unit="ex",
        ):
            # The record's own place (file:line) when meta.source holds a user's description.
            where = str(ex.meta.get("location") or ex.meta.get("source") or ex.id)
            if ex.id in seen:
                ctx.reject(
                    f"duplicate id {ex.id!r} (first seen at {seen[ex.id]})",
                    where,
                    "ids must be unique across all sources; rename one",
                )
                continue
            seen[ex.id] = where
            examples.append(attrs.evolve(ex, meta={**ex.meta, "source_plugin": part.name}))
            count += 1
        report.per_source[label] = count
    if not examples:
        raise DataError(
            "the recipe's sources yielded no examples",
            where="[data.sources]",
            fix="check the paths and globs; `lorakit check` lists what each source read",
        )
    return examples


def require_training_examples(splits: Splits, data: DataSection) -> None:
    """Stop before anything is written when the train split is empty (``check`` and ``run``)."""
    if splits.train:
        return
    total = len(splits.train) + len(splits.val) + len(splits.test)
    raise DataError(
        f"the train split is empty: the {total} examples read went to val "
        f"({len(splits.val)}) and test ({len(splits.test)})",
        where="[data]",
        fix=f"add more examples, or lower data.val_fraction ({data.val_fraction:g}) and "
        f"data.test_fraction ({data.test_fraction:g}), e.g. to 0 for a tiny data set",
    )


def load_splits(
    sources: Sequence[SourceComponent],
    data: DataSection,
    recipe_dir: Path,
    report: DataReport | None = None,
) -> Splits:
    """Read the sources and split the examples deterministically (``data``'s fractions, seed)."""
    report = report if report is not None else DataReport()
    examples = read_examples(sources, data, recipe_dir, report)
    parts = assign_splits(examples, data.split_seed, data.val_fraction, data.test_fraction)
    for name, fraction in (("val", data.val_fraction), ("test", data.test_fraction)):
        if fraction > 0 and not parts[name]:
            # Each example's split comes from a hash of its content, so on a small dataset a
            # split can come out empty by chance; say so rather than silently skip evaluation.
            report.warnings.append(
                f"data.{name}_fraction = {fraction:g} put none of the {len(examples)} examples "
                f"in {name} (splits hash each example, so small datasets vary): set "
                f"data.split_seed to another value, or pin examples with meta.split"
            )
    return Splits(train=parts["train"], val=parts["val"], test=parts["test"])


def _fits(formatter: Any, tokenizer: Any, max_length: int, template: Example) -> Any:
    def fits(text: str) -> bool:
        rendered = formatter.render(attrs.evolve(template, text=text), tokenizer)
        ids, _ = encode_with_offsets([rendered.text], tokenizer)
        return len(ids[0]) <= max_length

    return fits


def _token_ends(text: str, tokenizer: Any) -> list[int]:
    """Where ``text``'s tokens end (characters), tokenized once: the chunker's candidate cuts."""
    _, offsets = encode_with_offsets([text], tokenizer)
    return [e for _, e in offsets[0]]


def chunk_long_documents(
    examples: Sequence[Example],
    rows: Sequence[Tokenized],
    formatter: Any,
    tokenizer: Any,
    max_length: int,
    report: DataReport,
) -> tuple[list[Example], list[Tokenized]]:
    """Replace over-long ``meta.chunkable`` raw-text examples by chunks that fit max_length.

    Chunk ``k`` of example ``x`` gets id ``x#k`` and ``meta.chunk = [k, total]``; the chunks
    concatenate back into the original text.
    """
    out_ex: list[Example] = []
    out_rows: list[Tokenized] = []
    for ex, row in zip(examples, rows, strict=True):
        if len(row.input_ids) <= max_length or ex.text is None or not ex.meta.get("chunkable"):
            out_ex.append(ex)
            out_rows.append(row)
            continue
        try:
            pieces = chunk_text(
                ex.text,
                _fits(formatter, tokenizer, max_length, ex),
                _token_ends(ex.text, tokenizer),
            )
        except ValueError as exc:
            raise DataError(
                f"cannot chunk example {ex.id}: {exc} (train.max_length={max_length} leaves no "
                "room after the format's own tokens)",
                where=str(ex.meta.get("source", ex.id)),
                fix="raise [train].max_length",
            ) from None
        chunks = [
            attrs.evolve(
                ex, id=f"{ex.id}#{k}", text=piece, meta={**ex.meta, "chunk": [k, len(pieces)]}
            )
            for k, piece in enumerate(pieces)
        ]
        report.chunked[ex.id] = len(chunks)
        out_ex += chunks
        out_rows += tokenize_batch([formatter.render(c, tokenizer) for c in chunks], tokenizer)
    return out_ex, out_rows


def render_and_tokenize(
    examples: Sequence[Example], formatter: Any, tokenizer: Any, max_length: int, report: DataReport
) -> tuple[list[Example], list[Tokenized]]:
    """Render and tokenize every example; chunk long chunkable documents. No policy applied."""
    rendered = [
        formatter.render(ex, tokenizer) for ex in bar(examples, desc="formatting", unit="ex")
    ]
    rows = tokenize_batch(rendered, tokenizer)
    return chunk_long_documents(examples, rows, formatter, tokenizer, max_length, report)


def apply_overlength(
    examples: Sequence[Example],
    rows: Sequence[Tokenized],
    max_length: int,
    overlength: str,
    report: DataReport,
) -> list[Tokenized]:
    """Apply the overlength policy and drop rows with nothing to learn, counting each drop."""
    kept: list[Tokenized] = []
    for ex, row in zip(examples, rows, strict=True):
        if row.n_supervised == 0:
            report.dropped["no supervised token (nothing to learn)"] += 1
            continue
        if len(row.input_ids) > max_length:
            if overlength == "error":
                raise DataError(
                    f"example is {len(row.input_ids)} tokens, over train.max_length={max_length}",
                    where=str(ex.meta.get("source", ex.id)),
                    fix='raise [train].max_length, shorten the example, or set [data] overlength = "drop"',
                )
            if overlength == "drop":
                report.dropped[f"longer than train.max_length={max_length}"] += 1
                continue
            cut = Tokenized(row.input_ids[:max_length], row.labels[:max_length])
            if cut.n_supervised == 0:
                report.dropped[f"answer entirely beyond train.max_length={max_length}"] += 1
                continue
            report.truncated += 1
            row = cut
        kept.append(row)
    return kept


def tokenize_examples(
    examples: Sequence[Example],
    formatter: Any,
    tokenizer: Any,
    max_length: int,
    overlength: str,
    report: DataReport,
) -> list[Tokenized]:
    """Render and tokenize; chunk long documents; apply the overlength policy; drop rows with
    nothing to learn.

    Every drop is counted in ``report`` with its reason; nothing disappears silently.
    """
    examples, rows = render_and_tokenize(examples, formatter, tokenizer, max_length, report)
    return apply_overlength(examples, rows, max_length, overlength, report)


def supervised_share(rows: Sequence[Tokenized]) -> float:
    total = sum(len(r.labels) for r in rows)
    return sum(1 for r in rows for t in r.labels if t != IGNORE_INDEX) / total if total else 0.0


def read_split_files(folder: Path) -> Splits | None:
    """The splits a run saved (``write_splits``), or None when the folder does not hold all three.

    A run's saved splits are what it was trained and evaluated on, whatever its sources hold now.
    """
    import json

    from lorakit.contracts import Message

    files = {name: folder / f"{name}.jsonl" for name in ("train", "val", "test")}
    if not all(f.is_file() for f in files.values()):
        return None
    parts: dict[str, list[Example]] = {}
    for name, path in files.items():
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            messages = r.get("messages")
            rows.append(
                Example(
                    id=r["id"],
                    messages=None
                    if messages is None
                    else tuple(Message(m["role"], m["content"]) for m in messages),
                    text=r.get("text"),
                    meta=r.get("meta", {}),
                )
            )
        parts[name] = rows
    return Splits(train=parts["train"], val=parts["val"], test=parts["test"])


def write_splits(folder: Path, splits: Splits) -> None:
    """Write ``{train,val,test}.jsonl`` in the normalized contract (atomically, per file)."""
    import os

    from lorakit.diskfull import disk_full_is_an_error

    kept = "no split file was left half-written (each is written whole, then renamed)"
    with disk_full_is_an_error(folder, "the data splits", kept):
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("train", "val", "test"):
            tmp = folder / f".{name}.jsonl.{os.getpid()}.tmp"
            try:
                with tmp.open("w", encoding="utf-8") as f:
                    for ex in splits.get(name):
                        f.write(_json_line(ex))
                os.replace(tmp, folder / f"{name}.jsonl")
            finally:
                tmp.unlink(missing_ok=True)


def _json_line(ex: Example) -> str:
    """One split-file line: strict JSON (no NaN/Infinity) that encodes as UTF-8."""
    import json

    try:
        line = json.dumps(ex.to_json(), ensure_ascii=False, allow_nan=False) + "\n"
        line.encode("utf-8")
    except (ValueError, TypeError) as exc:  # UnicodeEncodeError is a ValueError
        raise DataError(
            f"example {ex.id!r} cannot be saved as JSON: {exc}",
            where=str(ex.meta.get("location") or ex.meta.get("source") or ex.id),
            fix="data must be plain JSON values: no NaN/Infinity, no lone surrogates; fix the "
            f"record or the {ex.meta.get('source_plugin', 'source')} plugin",
        ) from None
    return line
