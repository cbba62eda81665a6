"""``csv``: a lorakit data source for CSV/TSV files, one conversation per row.

Each row becomes an optional system message, a user turn (the ``prompt`` column) and an
assistant turn (the ``response`` column). Optional columns give the id, the split and tags.
Everything lorakit-specific comes from ``lorakit.api``, the public API for plugins.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import attrs
from lorakit.api import (
    SPLITS,
    DataError,
    Example,
    Message,
    RegisterSource,
    SourceContext,
    expand_files,
    hookimpl,
    option,
    read_text_file,
)

__version__ = "0.1.0"

DELIMITERS = {",": ",", "\t": "\t", ";": ";", "|": "|"}


@attrs.frozen
class CsvOptions:
    path: str = option(doc="a .csv/.tsv file, or a folder of them (relative to the recipe file)")
    glob: str = option("**/*.[ct]sv", doc="which files to read when path is a folder")
    delimiter: Literal["auto", ",", "\t", ";", "|"] = option(
        "auto", doc='field separator; auto: tab for .tsv files, else ","'
    )
    prompt: str = option("prompt", doc="column holding the user turn")
    response: str = option("response", doc="column holding the assistant turn")
    system: str = option("", doc='column holding a system message ("": none)')
    id: str = option("", doc='column holding a unique id ("": a hash of the row\'s content)')
    split: str = option(
        "", doc='column holding train/val/test ("" or an empty cell: lorakit\'s hashed split)'
    )
    tags: str = option("", doc='column holding tags separated by ";" ("": none)')


def content_id(system: str, prompt: str, response: str) -> str:
    """A stable id for a row without an id column: identical rows get identical ids."""
    blob = "\0".join((system, prompt, response)).encode("utf-8")
    return "csv-" + hashlib.sha256(blob).hexdigest()[:16]


class CsvSource:
    Options = CsvOptions

    def __init__(self, options: CsvOptions):
        self.options = options

    def read(self, ctx: SourceContext) -> Iterator[Example]:
        for file in expand_files(ctx.recipe_dir, self.options.path, self.options.glob, "path"):
            yield from self.read_file(file, ctx)

    def delimiter_for(self, file: Path) -> str:
        if self.options.delimiter != "auto":
            return DELIMITERS[self.options.delimiter]
        return "\t" if file.suffix.lower() == ".tsv" else ","

    def columns(self, file: Path, header: list[str]) -> None:
        """Every column the options name must be in the header (a whole-file error)."""
        o = self.options
        wanted = {"prompt": o.prompt, "response": o.response, "system": o.system, "id": o.id}
        wanted |= {"split": o.split, "tags": o.tags}
        for key, column in wanted.items():
            if column and column not in header:
                close = difflib.get_close_matches(column, header, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise DataError(
                    f"no column {column!r} (the header has {', '.join(map(repr, header))})",
                    where=f"{file}:1",
                    fix=f'{hint}set {key} = "<column>" in the [[data.sources]] table',
                )

    def read_file(self, file: Path, ctx: SourceContext) -> Iterator[Example]:
        text = read_text_file(file, ctx, "CSV")  # gzip, size, UTF-8 (with line) and BOM checks
        if text is None:
            return
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=self.delimiter_for(file))
        try:
            header = next(reader)
        except (StopIteration, csv.Error) as exc:
            ctx.reject(f"cannot read the header row: {exc}", f"{file}:1", "fix the first line")
            return
        self.columns(file, header)
        while True:
            start = reader.line_num + 1
            where = f"{file}:{start}"
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                ctx.reject(f"malformed CSV: {exc}", where, "fix the quoting on this line")
                return  # the reader cannot resynchronise after a quoting error
            if not any(cell.strip() for cell in row):
                continue  # blank line
            if len(row) != len(header):
                ctx.reject(
                    f"row has {len(row)} fields, the header has {len(header)}",
                    where,
                    "quote cells that contain the delimiter, or fill in the missing cells",
                )
                continue
            example = self.parse(dict(zip(header, row, strict=True)), where, ctx)
            if example is not None:
                yield example

    def parse(self, row: dict[str, str], where: str, ctx: SourceContext) -> Example | None:
        o = self.options
        prompt, response = row[o.prompt], row[o.response]
        system = row[o.system] if o.system else ""
        if not prompt.strip() or not response.strip():
            empty = o.prompt if not prompt.strip() else o.response
            ctx.reject(f"column {empty!r} is empty", where, "fill it in or drop the row")
            return None
        rid = row[o.id].strip() if o.id else content_id(system, prompt, response)
        if not rid:
            ctx.reject(f"column {o.id!r} (the id) is empty", where, "give every row an id")
            return None
        meta: dict[str, object] = {"source": where}
        if o.split:
            split = row[o.split].strip().lower()
            if split and split not in SPLITS:
                ctx.reject(
                    f"column {o.split!r} is {row[o.split]!r}",
                    where,
                    "use train, val or test (or leave the cell empty)",
                )
                return None
            if split:
                meta["split"] = split
        if o.tags:
            meta["tags"] = [t.strip() for t in row[o.tags].split(";") if t.strip()]
        messages = [Message("system", system)] if system.strip() else []
        messages += [Message("user", prompt), Message("assistant", response)]
        return Example(id=rid, messages=tuple(messages), meta=meta)


@hookimpl
def lorakit_register_sources(register: RegisterSource) -> None:
    register("csv", CsvSource)
