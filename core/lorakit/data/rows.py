"""Examples -> tokenized rows: render, tokenize, chunk long documents, apply the overlength
policy, counting every drop in the data report."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterable, Iterator, Sequence, Sized
from pathlib import Path
from typing import Any

import attrs

from lorakit.contracts import Example
from lorakit.data.chunk_rows import chunk_document
from lorakit.data.report import DataReport
from lorakit.data.row_files import RowWriter, TokenRows
from lorakit.data.special_text import check_special_text
from lorakit.data.tokenize import Tokenized, encode_with_offsets, tokenize_batch
from lorakit.errors import DataError
from lorakit.progress import bar

BATCH = 1024  # examples rendered and tokenized per call: large enough to batch, small to hold


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


def _chunkable(ex: Example) -> bool:
    return ex.text is not None and bool(ex.meta.get("chunkable"))


def _chunked(
    ex: Example, formatter: Any, tokenizer: Any, max_length: int, report: DataReport
) -> tuple[list[Example], list[Tokenized]]:
    """``ex`` as chunks that fit and their rows (``[ex]`` and its row when it fits whole)."""
    try:
        pieces, rows, shown = chunk_document(ex, formatter, tokenizer, max_length)
    except ValueError as exc:
        raise DataError(
            f"cannot chunk example {ex.id}: {exc} (train.max_length={max_length} leaves no "
            "room after the format's own tokens)",
            where=str(ex.meta.get("source", ex.id)),
            fix="raise [train].max_length",
        ) from None
    if len(pieces) == 1:
        return [ex], rows
    chunks = [
        attrs.evolve(ex, id=f"{ex.id}#{k}", text=piece, meta={**ex.meta, "chunk": [k, len(pieces)]})
        for k, piece in enumerate(pieces)
    ]
    report.chunked[ex.id] = len(chunks)
    # A chunk's row was tokenized from the document's example with the chunk's text; a format
    # that writes the id or meta renders the chunk differently: tokenize that one again.
    rendered = [formatter.render(c, tokenizer) for c in chunks]
    redo = [k for k, r in enumerate(rendered) if r != shown[k]]
    for k, row in zip(redo, tokenize_batch([rendered[k] for k in redo], tokenizer), strict=True):
        rows[k] = row
    return chunks, rows


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
        if len(row.input_ids) <= max_length or not _chunkable(ex):
            out_ex.append(ex)
            out_rows.append(row)
            continue
        chunks, chunk_rows = _chunked(ex, formatter, tokenizer, max_length, report)
        out_ex += chunks
        out_rows += chunk_rows
    return out_ex, out_rows


def render_and_tokenize(
    examples: Sequence[Example], formatter: Any, tokenizer: Any, max_length: int, report: DataReport
) -> tuple[list[Example], list[Tokenized]]:
    """Render and tokenize every example; chunk long chunkable documents. No policy applied.

    A chunkable text longer than ``max_length`` characters goes to the chunker without being
    tokenized whole first (the chunker keeps it whole when it fits). An answer labelled
    undesirable (``Example.label`` False, KTO's data) is dropped and counted: SFT imitates
    answers, so it learns only from the desirable ones."""
    if any(ex.label is False for ex in examples):
        report.dropped["undesirable answer (label false: only objective kto learns from it)"] += (
            sum(ex.label is False for ex in examples)
        )
        examples = [ex for ex in examples if ex.label is not False]
    check_special_text(examples, tokenizer, report)
    long = [_chunkable(ex) and len(ex.text or "") > max_length for ex in examples]
    short = [ex for ex, is_long in zip(examples, long, strict=True) if not is_long]
    rows = iter(tokenize_batch([formatter.render(ex, tokenizer) for ex in short], tokenizer))
    out_ex: list[Example] = []
    out_rows: list[Tokenized] = []
    for ex, is_long in zip(examples, long, strict=True):
        if is_long:
            pieces, piece_rows = _chunked(ex, formatter, tokenizer, max_length, report)
        else:
            pieces, piece_rows = chunk_long_documents(
                [ex], [next(rows)], formatter, tokenizer, max_length, report
            )
        out_ex += pieces
        out_rows += piece_rows
    return out_ex, out_rows


def iter_tokenized(
    examples: Iterable[Example],
    formatter: Any,
    tokenizer: Any,
    max_length: int,
    report: DataReport,
    batch: int = BATCH,
) -> Iterator[tuple[list[Example], list[Tokenized]]]:
    """:func:`render_and_tokenize` over ``batch`` examples at a time (same rows, in order), so
    nothing but the rows a caller keeps grows with the data set."""
    total = len(examples) if isinstance(examples, Sized) else None
    it = iter(bar(examples, desc="formatting", unit="ex", total=total))
    while chunk := list(itertools.islice(it, batch)):
        yield render_and_tokenize(chunk, formatter, tokenizer, max_length, report)


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
    examples: Iterable[Example],
    formatter: Any,
    tokenizer: Any,
    max_length: int,
    overlength: str,
    report: DataReport,
) -> TokenRows:
    """Render and tokenize; chunk long documents; apply the overlength policy; drop rows with
    nothing to learn.

    Every drop is counted in ``report`` with its reason; nothing disappears silently. Examples
    are streamed (``examples`` may be a spooled split) and the rows kept are written, a batch
    at a time, to memory-mapped files (:mod:`lorakit.data.row_files`): memory does not grow
    with the tokens.
    """
    from lorakit.diskfull import disk_full_is_an_error

    writer = RowWriter()
    try:
        with disk_full_is_an_error(
            Path(tempfile.gettempdir()),
            "the tokenized rows",
            "nothing was written to the run folder",
            fix="free some space there, or set TMPDIR to a folder on a disk with room for the "
            "tokenized data (8 bytes a token), and run the command again",
        ):
            for pieces, rows in iter_tokenized(examples, formatter, tokenizer, max_length, report):
                writer.add(apply_overlength(pieces, rows, max_length, overlength, report))
            return writer.finish()
    finally:
        writer.close()


def supervised_share(rows: Iterable[Any]) -> float:
    """The share of supervised tokens in these rows (a preference pair's: its chosen side)."""
    if isinstance(rows, TokenRows):
        total = rows.total_tokens
        return rows.supervised_tokens / total if total else 0.0
    n = supervised = 0
    for row in rows:
        row = getattr(row, "chosen", row)
        n += len(row.labels)
        supervised += row.n_supervised
    return supervised / n if n else 0.0
