"""``markdown``: a folder of ``.md`` files, one raw-text example per document.

Schema: every file matching ``include`` (and no ``exclude`` glob) under ``path``, read
recursively in sorted order. An optional front-matter block at the very top::

    ---
    title: Getting started
    tags: [guide, intro]
    split: val
    ---

is kept out of the text and parsed as YAML (``yaml.safe_load``, as Jekyll, Hugo and Obsidian
write it: nested keys and block lists included) into ``meta.front_matter``; dates become ISO
strings so the metadata stays JSON. ``tags`` (a list, or one string) and ``split``
(train/val/test) from it become ``meta.tags`` and ``meta.split``. The id is the file's path
relative to ``path``; ``meta.source`` is the file path.

Long documents are never truncated: examples are marked ``meta.chunkable`` and the pipeline
cuts those longer than ``train.max_length`` tokens into chunks that fit, at heading or paragraph
boundaries where possible (see :mod:`lorakit.data.chunking`). The chunks concatenate back into
the document text exactly.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
from lorakit.api import (
    DataError,
    Example,
    RegisterSource,
    SourceContext,
    YamlRefused,
    hookimpl,
    matching_files,
    non_empty_path,
    option,
    read_text_file,
    refuse_special,
    refuse_unsafe_yaml,
    resolve_path,
)

_FRONT = re.compile(r"\A---[ \t]*\r?\n(.*?\r?\n)?---[ \t]*(?:\r?\n|\Z)", re.DOTALL)


class FrontMatterError(ValueError):
    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line  # 0-based line within the block


def _json_safe(value: Any) -> Any:
    """YAML values as JSON values: dates as ISO strings, keys as strings."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return str(value)


MAX_FRONT_MATTER_DEPTH = 32


def parse_front_matter(block: str) -> dict[str, Any]:
    """Parse a YAML front-matter block into a JSON-safe mapping; raise ``FrontMatterError``."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        # no alias, no deep nesting, no key given twice (safe_yaml.py), before building
        refuse_unsafe_yaml(block, MAX_FRONT_MATTER_DEPTH)
        data = yaml.load(block, Loader=loader)  # a safe loader: plain data only
    except YamlRefused as exc:
        raise FrontMatterError(f"front matter: {exc.problem}; {exc.fix}", exc.line) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FrontMatterError(
            f"front matter is not valid YAML: {problem}", mark.line if mark else 0
        ) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FrontMatterError(
            f"front matter must be `key: value` pairs, not a {type(data).__name__}", 0
        )
    return _json_safe(data)


def split_front_matter(text: str) -> tuple[str | None, str]:
    """``(front-matter block or None, body)``; the body is everything after the closing ---."""
    m = _FRONT.match(text)
    if not m:
        return None, text
    return m.group(1) or "", text[m.end() :]


@attrs.frozen
class MarkdownOptions:
    path: str = option(
        doc="a folder of markdown files, or one file (relative to the recipe file)",
        validator=non_empty_path,
    )
    include: list[str] = option(
        factory=lambda: ("**/*.md", "**/*.markdown"), doc="globs of files to read, under path"
    )
    exclude: list[str] = option(
        factory=tuple,
        doc="globs of files to skip; a folder that matches skips all under it (e.g. drafts)",
    )
    chunk: bool = option(
        True,
        doc="cut documents longer than train.max_length into chunks that fit (false: the "
        "[data] overlength policy applies instead)",
    )


class MarkdownSource:
    Options = MarkdownOptions

    def __init__(self, options: MarkdownOptions):
        self.options = options

    def files(self, recipe_dir: Path) -> tuple[Path, list[Path]]:
        root = resolve_path(recipe_dir, self.options.path)
        if root.is_file():
            return root.parent, [root]
        refuse_special(root, "path")
        if not root.is_dir():
            raise DataError(
                f"{root} does not exist",
                where="[data.sources].path",
                fix="paths are relative to the recipe file's folder; check the spelling",
            )
        files = matching_files(root, self.options.include, self.options.exclude, "include")
        if not files:
            raise DataError(
                f"folder {root} has no markdown files matching {', '.join(self.options.include)}",
                where="[data.sources].path",
                fix="point path at a folder of .md files, or adjust include/exclude",
            )
        return root, files

    def read(self, ctx: SourceContext) -> Iterator[Example]:
        root, files = self.files(ctx.recipe_dir)
        for file in files:
            example = self.read_file(file, root, ctx)
            if example is not None:
                yield example

    def read_file(self, file: Path, root: Path, ctx: SourceContext) -> Example | None:
        text = read_text_file(file, ctx, "markdown")
        if text is None:
            return None
        block, body = split_front_matter(text)
        meta: dict[str, Any] = {"source": str(file), "path": file.relative_to(root).as_posix()}
        if block is not None:
            try:
                fields = parse_front_matter(block)
            except FrontMatterError as exc:
                ctx.reject(
                    str(exc),
                    f"{file}:{exc.line + 2}",  # the block starts on the line after the first ---
                    "fix the YAML between the --- markers (quote values that hold ': ' or start "
                    "with a special character)",
                )
                return None
            meta["front_matter"] = fields
            tags = fields.get("tags")
            if isinstance(tags, str):
                tags = [tags]
            if isinstance(tags, list):
                meta["tags"] = [str(t) for t in tags]
            if "split" in fields:
                if fields["split"] not in ("train", "val", "test"):
                    ctx.reject(
                        f"front matter split is {fields['split']!r}",
                        str(file),
                        "use train, val or test, or leave it out",
                    )
                    return None
                meta["split"] = fields["split"]
        if not body.strip():
            ctx.reject("document has no text after its front matter", str(file), "add content")
            return None
        if self.options.chunk:
            meta["chunkable"] = True
        return Example(id=meta["path"], text=body, meta=meta)


@hookimpl
def lorakit_register_sources(register: RegisterSource) -> None:
    register("markdown", MarkdownSource)
