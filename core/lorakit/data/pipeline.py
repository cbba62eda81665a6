"""Recipe -> examples -> splits -> tokenized rows, with every skip and drop counted.

``lorakit check``, ``prepare`` and ``run`` all go through here, so they agree on what is read,
which split each example lands in, and what is dropped and why.

Everything streams: each example is checked, given its split and written to that split's spool
file (:mod:`lorakit.data.spool`) as the source yields it, so memory holds a few dozen bytes per
example (a content key, a line offset, an id hash) rather than the examples; tokenization
(:mod:`lorakit.data.rows`) goes a batch at a time and keeps only compact rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from lorakit.contracts import SPLITS, Example
from lorakit.data.report import DataReport, ReadContext, example_where
from lorakit.data.rows import (  # re-exported: the pipeline's one import place
    _fits,
    _token_ends,
    apply_overlength,
    chunk_long_documents,
    iter_tokenized,
    render_and_tokenize,
    supervised_share,
    tokenize_examples,
)
from lorakit.data.splits import SplitAssigner
from lorakit.data.spool import SplitSpool, SpooledExamples, example_from_json, fingerprint_of
from lorakit.data.validate import checked_records
from lorakit.errors import DataError
from lorakit.progress import bar
from lorakit.sections import DataSection

if TYPE_CHECKING:
    from lorakit.components import SourceComponent

__all__ = [
    "DataReport",
    "ReadContext",
    "Splits",
    "_fits",
    "_token_ends",
    "apply_overlength",
    "chunk_long_documents",
    "iter_tokenized",
    "load_splits",
    "read_examples",
    "read_split_files",
    "render_and_tokenize",
    "require_training_examples",
    "supervised_share",
    "tokenize_examples",
    "write_splits",
]


@attrs.frozen
class Splits:
    """The three splits: lists, or (from :func:`load_splits` and :func:`read_split_files`)
    sequences read back from their JSONL files."""

    train: Sequence[Example]
    val: Sequence[Example]
    test: Sequence[Example]
    _memo: dict[str, str] = attrs.field(init=False, factory=dict, eq=False, repr=False)

    def get(self, name: str) -> Sequence[Example]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    @property
    def fingerprint(self) -> str:
        """A short hash of train, val and test in order (streamed; computed once)."""
        if "fingerprint" not in self._memo:
            self._memo["fingerprint"] = fingerprint_of([self.train, self.val, self.test])
        return self._memo["fingerprint"]


def _content(ex: Example) -> dict:
    """What an example holds besides its id and meta, as JSON data."""
    return {k: v for k, v in ex.to_json().items() if k not in ("id", "meta")}


class _SeenIds:
    """Ids seen so far, as 64-bit hashes pointing at the example (read back to confirm a match,
    so a hash collision is never taken for a duplicate): ~100 bytes an id, not the ids."""

    def __init__(self, example_at: Callable[[int], Example]) -> None:
        self.example_at = example_at
        self.by_hash: dict[int, int] = {}
        self.collided: dict[str, int] = {}  # ids whose hash an earlier, different id has
        self.hash = hash

    def first(self, rid: str) -> Example | None:
        """The earlier example with id ``rid``, or None."""
        j = self.by_hash.get(self.hash(rid))
        if j is None:
            return None
        first = self.example_at(j)
        if first.id == rid:
            return first
        k = self.collided.get(rid)
        return None if k is None else self.example_at(k)

    def add(self, rid: str, index: int) -> None:
        if self.by_hash.setdefault(self.hash(rid), index) != index:
            self.collided.setdefault(rid, index)


def iter_examples(
    sources: Sequence[SourceComponent],
    data: DataSection,
    recipe_dir: Path,
    report: DataReport,
    example_at: Callable[[int], Example],
) -> Iterator[Example]:
    """Every example of every source, checked, in order, duplicates rejected; ``example_at(i)``
    gives back the ``i``-th example yielded (for a duplicate's message)."""
    ctx = ReadContext(recipe_dir=recipe_dir, on_error=data.on_error, report=report)
    seen = _SeenIds(example_at)
    index = 0
    for i, part in enumerate(sources):
        label = f"{i}:{part.name}"
        ctx.source = label
        count = 0
        for ex in bar(
            checked_records(part.source.read, ctx, part.entry, part.key),
            desc=f"reading {part.name}",
            unit="ex",
        ):
            where = example_where(ex)
            first = seen.first(ex.id)
            if first is not None:
                ctx.reject(
                    f"duplicate id {ex.id!r} (first seen at {example_where(first)})",
                    where,
                    "both hold the same example: drop one, or give each its own id to keep both "
                    '(a record without an "id" field gets one made from its content: add an "id" '
                    "field)"
                    if _content(first) == _content(ex)
                    else "ids must be unique across all sources; rename one",
                )
                continue
            seen.add(ex.id, index)
            index += 1
            count += 1
            yield attrs.evolve(ex, meta={**ex.meta, "source_plugin": part.name})
        report.per_source[label] = count
    if not index:
        raise DataError(
            "the recipe's sources yielded no examples",
            where="[data.sources]",
            fix="check the paths and globs; `lorakit check` lists what each source read",
        )


def read_examples(
    sources: Sequence[SourceComponent], data: DataSection, recipe_dir: Path, report: DataReport
) -> list[Example]:
    """Read every built ``[[data.sources]]`` table (``components.sources``), in order, with
    relative paths under ``recipe_dir``, into a list. Duplicate ids are an error (or a skip, per
    ``data.on_error``).

    Every record a source yields is checked against the ``Example`` contract
    (:mod:`lorakit.data.validate`); a record that breaks it, or a source that fails with
    anything but a lorakit error, is a ``PluginError`` naming the plugin and the record.
    :func:`load_splits` streams the same examples to disk instead.
    """
    examples: list[Example] = []
    examples += iter_examples(sources, data, recipe_dir, report, examples.__getitem__)
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
    """Read the sources and split the examples deterministically (``data``'s fractions, seed),
    the same splits as :func:`lorakit.data.splits.assign_splits` on the whole list, streamed to
    spool files: memory does not grow with the examples' size."""
    report = report if report is not None else DataReport()
    spool = SplitSpool()
    assigner = SplitAssigner(data.split_seed, data.val_fraction, data.test_fraction)

    def example_at(i: int) -> Example:
        import json

        return example_from_json(json.loads(spool.line(i)))

    from lorakit.diskfull import disk_full_is_an_error

    try:
        with disk_full_is_an_error(
            spool.folder.path,
            "the temporary split files",
            "nothing was written to the run folder",
            fix="free some space there, or set TMPDIR to a folder on a disk with room for the "
            "data set, and run the command again",
        ):
            for ex in iter_examples(sources, data, recipe_dir, report, example_at):
                spool.add(_json_line(ex), assigner.add(ex))
            moved = assigner.finish(lambda i: SPLITS[spool.codes[i]], example_at)
            parts = spool.finish(moved)
    except BaseException:
        spool.discard()
        raise
    total = sum(len(p) for p in parts.values())
    for name, fraction in (("val", data.val_fraction), ("test", data.test_fraction)):
        if fraction > 0 and not parts[name]:
            # Each example's split comes from a hash of its content, so on a small dataset a
            # split can come out empty by chance; say so rather than silently skip evaluation.
            report.warnings.append(
                f"data.{name}_fraction = {fraction:g} put none of the {total} examples "
                f"in {name} (splits hash each example, so small datasets vary): set "
                f"data.split_seed to another value, or pin examples with meta.split"
            )
    return Splits(train=parts["train"], val=parts["val"], test=parts["test"])


def read_split_files(folder: Path) -> Splits | None:
    """The splits a run saved (``write_splits``), or None when the folder does not hold all three.

    A run's saved splits are what it was trained and evaluated on, whatever its sources hold now.
    They are read back from the files as they are used (indexed here, not loaded).
    """
    files = {name: folder / f"{name}.jsonl" for name in ("train", "val", "test")}
    if not all(f.is_file() for f in files.values()):
        return None
    parts = {name: SpooledExamples.scan(path) for name, path in files.items()}
    return Splits(train=parts["train"], val=parts["val"], test=parts["test"])


def write_splits(folder: Path, splits: Splits) -> None:
    """Write ``{train,val,test}.jsonl`` in the normalized contract (atomically, per file).

    Spooled splits already hold these lines: their files are copied.
    """
    import os
    import shutil

    from lorakit.diskfull import disk_full_is_an_error

    kept = "no split file was left half-written (each is written whole, then renamed)"
    with disk_full_is_an_error(folder, "the data splits", kept):
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("train", "val", "test"):
            tmp = folder / f".{name}.jsonl.{os.getpid()}.tmp"
            part = splits.get(name)
            try:
                with tmp.open("wb") as f:
                    if isinstance(part, SpooledExamples):
                        with part.path.open("rb") as src:
                            shutil.copyfileobj(src, f, 1 << 20)
                    else:
                        for ex in part:
                            f.write(_json_line(ex))
                os.replace(tmp, folder / f"{name}.jsonl")
            finally:
                tmp.unlink(missing_ok=True)


def _json_line(ex: Example) -> bytes:
    """One split-file line: strict JSON (no NaN/Infinity), encoded as UTF-8."""
    import json

    try:
        line = (json.dumps(ex.to_json(), ensure_ascii=False, allow_nan=False) + "\n").encode()
    except (ValueError, TypeError) as exc:  # UnicodeEncodeError is a ValueError
        raise DataError(
            f"example {ex.id!r} cannot be saved as JSON: {exc}",
            where=example_where(ex),
            fix="data must be plain JSON values: no NaN/Infinity, no lone surrogates; fix the "
            f"record or the {ex.meta.get('source_plugin', 'source')} plugin",
        ) from None
    return line
