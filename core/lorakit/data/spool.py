"""Examples kept on disk: split files read back one line at a time.

A data set is read once and written, as it is read, into one JSONL file per split (the exact
lines ``write_splits`` saves), so memory holds only a few bytes per example (where each line
starts, a content key) and never the examples themselves: ``check`` and ``prepare`` on a
1 GB JSONL stay in bounded memory. :class:`SpooledExamples` is a read-only sequence over such
a file: ``len``, iteration in order (streamed), indexing and slicing (read back and parsed).

Temporary spools live in a ``lorakit-splits-*`` folder under ``$TMPDIR`` (point it at a disk
with room for the data set's size), removed when the last sequence over it is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import shutil
import tempfile
import weakref
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

from lorakit.contracts import SPLITS, Example
from lorakit.data.tools import message_from_json, tools_from_json


def example_from_json(record: dict[str, Any]) -> Example:
    """The ``Example`` a split-file line holds (the inverse of ``Example.to_json``)."""
    messages = record.get("messages")
    tools = record.get("tools")
    return Example(
        id=record["id"],
        messages=None if messages is None else tuple(message_from_json(m) for m in messages),
        text=record.get("text"),
        meta=record.get("meta", {}),
        tools=None if tools is None else tools_from_json(tools),
        rejected=None
        if record.get("rejected") is None
        else tuple(message_from_json(m) for m in record["rejected"]),
        label=record.get("label"),
    )


class SpoolFolder:
    """A temporary folder removed when the last object holding it is collected (or at exit)."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="lorakit-splits-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)

    def remove(self) -> None:
        self._cleanup()


class SpooledExamples(Sequence[Example]):
    """The examples of one JSONL file, in order; ``offsets`` are where their lines start
    (blank lines are not examples). ``owner`` keeps a temporary folder alive."""

    def __init__(self, path: Path, offsets: array, owner: SpoolFolder | None = None):
        self.path = path
        self.offsets = offsets
        self._owner = owner

    @classmethod
    def scan(cls, path: Path) -> SpooledExamples:
        """Index an existing split file (one pass, nothing parsed)."""
        offsets = array("q")
        pos = 0
        with path.open("rb") as f:
            for raw in f:
                if raw.strip():
                    offsets.append(pos)
                pos += len(raw)
        return cls(path, offsets)

    def __len__(self) -> int:
        return len(self.offsets)

    def lines(self) -> Iterator[bytes]:
        """The raw JSON lines, in order (streamed)."""
        if not self.offsets:
            return
        with self.path.open("rb") as f:
            f.seek(self.offsets[0])
            for raw in f:
                if raw.strip():
                    yield raw

    def __iter__(self) -> Iterator[Example]:
        for raw in self.lines():
            yield example_from_json(json.loads(raw))

    def _read(self, positions: Iterable[int]) -> list[Example]:
        out = []
        with self.path.open("rb") as f:
            for i in positions:
                f.seek(self.offsets[i])
                out.append(example_from_json(json.loads(f.readline())))
        return out

    @overload
    def __getitem__(self, index: int) -> Example: ...
    @overload
    def __getitem__(self, index: slice) -> list[Example]: ...
    def __getitem__(self, index: int | slice) -> Example | list[Example]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1 and start == 0:
                return list(itertools.islice(self, stop))
            return self._read(range(start, stop, step))
        n = len(self)
        if not -n <= index < n:
            raise IndexError(index)
        return self._read([index % n])[0]

    def __repr__(self) -> str:
        return f"SpooledExamples({self.path}, {len(self)} examples)"


def fingerprint_of(parts: Iterable[Sequence[Example]]) -> str:
    """``splits.fingerprint(train + val + test)`` without holding the examples: each line of a
    spooled part is parsed and written back with sorted keys, as ``Example.to_json`` would be."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, SpooledExamples):
            for raw in part.lines():
                value = json.loads(raw)
                h.update(json.dumps(value, sort_keys=True, ensure_ascii=False).encode())
                h.update(b"\n")
        else:
            for ex in part:
                h.update(json.dumps(ex.to_json(), sort_keys=True, ensure_ascii=False).encode())
                h.update(b"\n")
    return h.hexdigest()[:16]


class SplitSpool:
    """Writes each example's line to the file of its (provisional) split as it is read, and
    moves the few whose split changes at the end (an identical example pinned later by
    ``meta.split``) in one merge pass that keeps input order within each split."""

    def __init__(self) -> None:
        self.folder = SpoolFolder()
        self.files = {s: (self.folder.path / f"{s}.jsonl").open("wb") for s in SPLITS}
        self.codes = bytearray()  # provisional split (index into SPLITS) of each example
        self.offsets = array("q")  # where its line starts in that split's file
        self._ends = dict.fromkeys(SPLITS, 0)

    def add(self, line: bytes, split: str) -> int:
        """Append one example's line; returns its index (input order)."""
        self.offsets.append(self._ends[split])
        self.codes.append(SPLITS.index(split))
        self.files[split].write(line)
        self._ends[split] += len(line)
        return len(self.codes) - 1

    def line(self, index: int) -> bytes:
        """The line of example ``index`` (read back from its file)."""
        f = self.files[SPLITS[self.codes[index]]]
        f.flush()
        with open(f.name, "rb") as r:
            r.seek(self.offsets[index])
            return r.readline()

    def finish(self, moved: dict[int, str]) -> dict[str, SpooledExamples]:
        """Close the files, move the examples in ``moved`` (index -> final split) and return
        each split's sequence."""
        for f in self.files.values():
            f.close()
        paths = {s: self.folder.path / f"{s}.jsonl" for s in SPLITS}
        per_split = {s: array("q") for s in SPLITS}
        if not moved:
            for code, offset in zip(self.codes, self.offsets, strict=True):
                per_split[SPLITS[code]].append(offset)
        else:
            new = {s: self.folder.path / f"{s}.merged.jsonl" for s in SPLITS}
            readers = {s: paths[s].open("rb") for s in SPLITS}
            writers = {s: new[s].open("wb") for s in SPLITS}
            ends = dict.fromkeys(SPLITS, 0)
            try:
                for i, code in enumerate(self.codes):
                    line = readers[SPLITS[code]].readline()
                    target = moved.get(i, SPLITS[code])
                    per_split[target].append(ends[target])
                    writers[target].write(line)
                    ends[target] += len(line)
            finally:
                for r in readers.values():
                    r.close()
                for w in writers.values():
                    w.close()
            for s in SPLITS:
                new[s].replace(paths[s])
        del self.codes, self.offsets
        return {s: SpooledExamples(paths[s], per_split[s], self.folder) for s in SPLITS}

    def discard(self) -> None:
        """Close and remove the spool after a failure; never raises (a full disk fails the
        buffered write a close flushes again, and the error that stopped the read is the one
        to report)."""
        for f in self.files.values():
            with contextlib.suppress(OSError):
                f.close()
        self.folder.remove()
