"""Tokenized rows in memory-mapped files rather than in the process's memory.

``lorakit run`` tokenizes its train and val splits once and reads them for the whole run; held
in memory they take 8 bytes a token (ids and labels, ``int32``) plus a few objects a row, so a
big data set's rows alone would grow the run's memory with the data. :class:`RowWriter`
appends each row to two flat files (all ids, all labels) as it is tokenized, and
:meth:`RowWriter.finish` maps them read-only into a :class:`TokenRows`: a sequence of
:class:`Tokenized` whose ``i``-th row is copied out of the maps when it is asked for (an
``array("i")``, like an in-memory row). Memory holds where each row starts (8 bytes a row); the
tokens are pages the kernel reads in, keeps cached and drops again as it needs.

The files are unnamed (``tempfile.TemporaryFile``, ``O_TMPFILE``, under ``$TMPDIR``): they exist
only while the maps do, so nothing is left on disk however the process ends (a SIGKILL
included). Rows are written in order and never change, so a run and its resume read the same
rows.
"""

from __future__ import annotations

import mmap
import tempfile
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

from lorakit.data.tokenize import IGNORE_INDEX, Tokenized

ITEM = array("i").itemsize  # bytes a token takes in each file


class TokenRows(Sequence[Tokenized]):
    """Rows read from two buffers of ``int32`` (memory maps, or bytes after unpickling):
    row ``i`` is tokens ``offsets[i]`` to ``offsets[i + 1]`` of each."""

    def __init__(
        self, offsets: array, ids: Any, labels: Any, supervised: int, maps: tuple = ()
    ) -> None:
        self.offsets = offsets
        self._ids = ids
        self._labels = labels
        self.supervised_tokens = supervised  # labels that are not IGNORE_INDEX, all rows
        self._maps = maps  # kept open as long as this sequence lives

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def total_tokens(self) -> int:
        return self.offsets[-1]

    def lengths(self) -> list[int]:
        """Each row's token count, from the offsets alone (no row is read)."""
        o = self.offsets
        return [o[i + 1] - o[i] for i in range(len(o) - 1)]

    def _row(self, i: int) -> Tokenized:
        a, b = self.offsets[i] * ITEM, self.offsets[i + 1] * ITEM
        ids, labels = array("i"), array("i")
        ids.frombytes(self._ids[a:b])
        labels.frombytes(self._labels[a:b])
        return Tokenized(input_ids=ids, labels=labels)

    @overload
    def __getitem__(self, i: int) -> Tokenized: ...

    @overload
    def __getitem__(self, i: slice) -> list[Tokenized]: ...

    def __getitem__(self, i: int | slice) -> Tokenized | list[Tokenized]:
        if isinstance(i, slice):
            return [self._row(j) for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} of {n}")
        return self._row(i)

    def __iter__(self) -> Iterator[Tokenized]:
        return (self._row(i) for i in range(len(self)))

    def __eq__(self, other: object) -> bool:  # like a list: the same rows in order
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable-like: compared by content

    def __reduce__(self) -> tuple:
        # A map cannot be pickled (a data loader worker started with "spawn"): send the bytes.
        n = self.offsets[-1] * ITEM
        return (
            TokenRows,
            (self.offsets, bytes(self._ids[:n]), bytes(self._labels[:n]), self.supervised_tokens),
        )


class RowWriter:
    """Rows appended in order to two unnamed temporary files; :meth:`finish` maps them."""

    def __init__(self) -> None:
        # closed by finish() or close(), the maps keep their own descriptors
        self._ids = tempfile.TemporaryFile(prefix="lorakit-rows-")  # noqa: SIM115
        self._labels = tempfile.TemporaryFile(prefix="lorakit-rows-")  # noqa: SIM115
        self.offsets = array("q", [0])
        self.supervised = 0

    def add(self, rows: Iterable[Tokenized]) -> None:
        for row in rows:
            ids, labels = _as_array(row.input_ids), _as_array(row.labels)
            self._ids.write(memoryview(ids).cast("B"))
            self._labels.write(memoryview(labels).cast("B"))
            self.offsets.append(self.offsets[-1] + len(ids))
            self.supervised += len(labels) - labels.count(IGNORE_INDEX)

    def finish(self) -> TokenRows:
        """The rows written, memory-mapped read-only (the files close with the maps)."""
        try:
            if self.offsets[-1] == 0:  # nothing to map: a map cannot be empty
                return TokenRows(self.offsets, b"", b"", self.supervised)
            maps = []
            for f in (self._ids, self._labels):
                f.flush()
                maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            return TokenRows(self.offsets, maps[0], maps[1], self.supervised, tuple(maps))
        finally:
            self.close()  # a map holds its own descriptor

    def close(self) -> None:
        self._ids.close()
        self._labels.close()


def _as_array(values: Sequence[int]) -> array:
    return values if isinstance(values, array) and values.typecode == "i" else array("i", values)


def row_lengths(rows: Sequence[Any]) -> list[int]:
    """Tokens of each training row: an SFT example's, or both sides of a preference pair;
    a :class:`TokenRows` answers from its offsets without reading a row."""
    if isinstance(rows, TokenRows):
        return rows.lengths()
    return [int(r.length) if hasattr(r, "length") else len(r.input_ids) for r in rows]
