"""``report_json``: JSON reports whose sections hold an improved text; one example per report.

Schema (one report per ``.json`` file, or a JSON array of reports in one file)::

    {
      "id": "report-17",                       # optional; default: the file path (+ [index])
      "sections": {                            # the key is the `sections_key` option
        "INTRODUCTION": {"original": "...", "improved": "..."},
        "METHODOLOGY":  {"original": "...", "improved": "..."},
        "RESULTS": "a plain string is taken as the text itself"
      },
      "meta": {"tags": ["physics"], "split": "val"}   # optional
    }

With ``sections_key = ""`` the sections are the report's top-level keys instead (``id`` and
``meta`` excepted). Each report becomes one raw-text example::

    ### INTRODUCTION:
    {improved}

    ### METHODOLOGY:
    {improved}

with sections in document order (the order of keys in the file), keeping only those named in
``sections`` when that list is not empty. Sections whose text is empty are left out; a report
with no text left is rejected. Bad input names the file and the JSON line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
from lorakit.api import (
    DataError,
    Example,
    JsonRefused,
    RegisterSource,
    SourceContext,
    expand_files,
    hookimpl,
    loads_strict,
    non_empty_path,
    option,
    parse_meta,
    read_text_file,
    resolve_path,
)


def render_report(sections: list[tuple[str, str]]) -> str:
    return "".join(f"### {name}:\n{text}\n\n" for name, text in sections)


@attrs.frozen
class ReportJsonOptions:
    path: str = option(
        doc="a .json report, or a folder of them (relative to the recipe file)",
        validator=non_empty_path,
    )
    glob: str = option("**/*.json", doc="which files to read when path is a folder")
    sections: list[str] = option(
        factory=tuple, doc='section names to keep, e.g. ["INTRODUCTION", "RESULTS"] (empty: all)'
    )
    field: str = option("improved", doc="which field of a section object holds the text")
    sections_key: str = option(
        "sections", doc='key of the object holding the sections ("": the top level)'
    )


class ReportJsonSource:
    Options = ReportJsonOptions

    def __init__(self, options: ReportJsonOptions):
        self.options = options
        self._found: set[str] = set()  # the section names the last read saw, upper case

    def read(self, ctx: SourceContext) -> Iterator[Example]:
        root = resolve_path(ctx.recipe_dir, self.options.path)
        base = root if root.is_dir() else root.parent
        self._found = set()
        yield from self._read(ctx, root, base)
        missing = [s for s in self.options.sections if s.upper() not in self._found]
        if missing and self._found:
            raise DataError(
                f"sections {', '.join(map(repr, missing))} are in none of the reports under {root}",
                where="[data.sources].sections",
                fix=f"the reports have {', '.join(sorted(self._found))}: correct the names, or "
                "remove them",
            )

    def _read(self, ctx: SourceContext, root: Path, base: Path) -> Iterator[Example]:
        for file in expand_files(ctx.recipe_dir, self.options.path, self.options.glob, "path"):
            text = read_text_file(file, ctx, "report")
            if text is None:
                continue
            try:
                data = loads_strict(text)
            except json.JSONDecodeError as exc:
                ctx.reject(
                    f"malformed JSON: {exc.msg} (column {exc.colno})",
                    f"{file}:{exc.lineno}",
                    'fix the file, or set [data] on_error = "skip" to skip bad files',
                )
                continue
            except JsonRefused as exc:
                ctx.reject(f"refused JSON: {exc}", str(file), exc.fix)
                continue
            default_id = file.relative_to(base).as_posix()
            if isinstance(data, list):
                for i, item in enumerate(data):
                    ex = self.parse(item, f"{file}[{i}]", f"{default_id}[{i}]", ctx)
                    if ex is not None:
                        yield ex
            else:
                ex = self.parse(data, str(file), default_id, ctx)
                if ex is not None:
                    yield ex

    def parse(self, report: Any, where: str, default_id: str, ctx: SourceContext) -> Example | None:
        key = self.options.sections_key
        if not isinstance(report, Mapping):
            ctx.reject(
                f"a report must be a JSON object, got {type(report).__name__}", where, _SCHEMA
            )
            return None
        if key:
            body = report.get(key)
            if not isinstance(body, Mapping):
                ctx.reject(f"report has no {key!r} object", where, _SCHEMA)
                return None
        else:
            body = {k: v for k, v in report.items() if k not in ("id", "meta")}
        rid = report.get("id", default_id)
        if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
            ctx.reject("id must be a non-empty string", where, 'use "id": "unique-name"')
            return None
        wanted = {s.upper() for s in self.options.sections}
        parts: list[tuple[str, str]] = []
        names = {str(name).upper() for name in body}
        self._found |= names
        for name, value in body.items():
            if wanted and name.upper() not in wanted:
                continue
            if isinstance(value, Mapping):
                value = value.get(self.options.field)
                if value is None:
                    ctx.reject(
                        f"section {name!r} has no {self.options.field!r} field",
                        where,
                        'add it, or set field = "..." to the field that holds the text',
                    )
                    return None
            if not isinstance(value, str):
                ctx.reject(
                    f"section {name!r}: text must be a string, got {type(value).__name__}",
                    where,
                    "use plain text",
                )
                return None
            if value.strip():
                parts.append((name, value))
        if not parts:
            if wanted and not wanted & names:
                ctx.reject(
                    f"report has none of the sections {', '.join(sorted(wanted))}",
                    where,
                    f"its sections are {', '.join(map(str, body)) or 'none'}: correct "
                    "[data.sources].sections, or fill in the report",
                )
            else:
                ctx.reject("report has no non-empty section text", where, "fill in the sections")
            return None
        meta = parse_meta(report, where, ctx)
        if meta is None:
            return None
        meta["sections"] = [name for name, _ in parts]
        return Example(id=str(rid), text=render_report(parts), meta=meta)


_SCHEMA = '{"sections": {"INTRODUCTION": {"improved": "..."}, ...}} (see docs/data.md)'


@hookimpl
def lorakit_register_sources(register: RegisterSource) -> None:
    register("report_json", ReportJsonSource)
