"""Careful JSONL reading and ``meta`` parsing: helpers shared by the JSON-based sources.

Errors name file and line and say what to do, instead of an opaque Arrow error deep in
``datasets``: gzip bytes, non-UTF-8, a JSON array where JSONL is expected, huge lines,
malformed JSON, duplicate keys, a ``meta`` that breaks the contract. Each format's own schema
lives in its plugin; plugins reach these helpers through :mod:`lorakit.api`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lorakit.contracts import SPLITS, SourceContext
from lorakit.errors import DataError

MAX_LINE_BYTES = 16 * 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"


def _check_file(path: Path, ctx: SourceContext) -> bool:
    """False (after ``ctx.reject``) when the file is gzip bytes rather than text."""
    with path.open("rb") as f:
        head = f.read(2)
    if head == GZIP_MAGIC:
        ctx.reject(
            "file is gzip-compressed, not plain JSONL",
            str(path),
            f"decompress it first: gunzip -c {path.name} > {path.stem}.plain.jsonl",
        )
        return False
    return True


MAX_NUMBER_DIGITS = 100
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class JsonRefused(ValueError):
    """Valid-looking JSON that lorakit does not accept; carries what to do about it."""

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.fix = fix


def _number(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise JsonRefused(
            f"a number with {len(digits.lstrip('-'))} digits",
            "write long ids and numbers as strings",
        )
    return int(digits)


def _no_constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not JSON", "write null or a string instead of NaN/Infinity")


def json_strings(value: Any) -> Iterator[str]:
    """Every string value in a JSON-like value (objects' values, arrays' items; keys are
    not values)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from json_strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from json_strings(item)


def loads_strict(text: str, **kwargs: Any) -> Any:
    """``json.loads`` for untrusted data: strict JSON only, as a ``ValueError`` when refused.

    Refuses (``JsonRefused``, with a fix) NaN/Infinity, numbers over ``MAX_NUMBER_DIGITS``
    digits, a key given twice in one object, nesting too deep to parse, and lone UTF-16
    surrogates (``"\\ud800"``, which no file can store as UTF-8); malformed JSON raises
    ``json.JSONDecodeError`` as usual.
    """
    kwargs.setdefault("object_pairs_hook", _no_duplicate_keys)
    try:
        value = json.loads(text, parse_int=_number, parse_constant=_no_constant, **kwargs)
    except RecursionError:
        raise JsonRefused(
            "nested too deeply to read", "flatten the record (lists/objects inside each other)"
        ) from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise JsonRefused(
                f"a lone surrogate {exc.object[exc.start]!r} is not text",
                "remove the broken \\ud800-\\udfff escape (half of a UTF-16 pair)",
            ) from None
        except RecursionError:
            raise JsonRefused("nested too deeply to read", "flatten the record") from None
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's pairs as a dict; a key given twice is refused (``json.loads`` would keep the
    last value and drop the first without a word)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise JsonRefused(f"duplicate key {dup!r}", "keep one value per key")
    return out


def iter_json_lines(path: Path, ctx: SourceContext) -> Iterator[tuple[str, Any]]:
    """Yield ``("file:line", parsed JSON)`` for each non-blank line."""
    if not _check_file(path, ctx):
        return
    seen_any = False
    with path.open("rb") as f:
        for lineno, raw in enumerate(_lines(f), start=1):
            where = f"{path}:{lineno}"
            if len(raw) > MAX_LINE_BYTES:
                ctx.reject(
                    f"line is over the {MAX_LINE_BYTES // 2**20} MiB limit for one record",
                    where,
                    "split the record, or check that the file really is one JSON object per line",
                )
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                ctx.reject(
                    f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
                    where,
                    "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                )
                continue
            if lineno == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark, as recipes accept
            if not text.strip():
                continue
            if lineno == 1 and text.lstrip().startswith("["):
                raise DataError(
                    "this is a JSON array, but JSONL (one JSON object per line) is expected",
                    where=where,
                    fix="convert it: jq -c '.[]' file.json > file.jsonl",
                )
            try:
                record = loads_strict(text)
            except json.JSONDecodeError as exc:
                ctx.reject(
                    f"malformed JSON: {exc.msg} (column {exc.colno})",
                    where,
                    'fix the line, or set [data] on_error = "skip" to skip bad lines',
                )
                continue
            except JsonRefused as exc:
                ctx.reject(f"refused JSON: {exc}", where, exc.fix)
                continue
            except ValueError as exc:
                ctx.reject(
                    f"malformed JSON: {exc}",
                    where,
                    'fix the line, or set [data] on_error = "skip" to skip bad lines',
                )
                continue
            seen_any = True
            yield where, record
    if not seen_any:
        ctx.reject("file holds no records", str(path), "add data, or remove it from the recipe")


def _lines(f) -> Iterator[bytes]:
    """Lines without their newline. A line over ``MAX_LINE_BYTES`` is not read whole: its first
    ``MAX_LINE_BYTES + 1`` bytes are yielded (enough to report it) and the rest is skipped."""
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while True:
                rest = f.readline(MAX_LINE_BYTES)
                if not rest or rest.endswith(b"\n"):
                    break
        yield raw.rstrip(b"\r\n")


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def parse_meta(record: Mapping[str, Any], where: str, ctx: SourceContext) -> dict[str, Any] | None:
    """``record["meta"]`` checked (a table; ``tags`` strings, ``split`` train/val/test,
    ``source`` a string), ``source`` defaulting to ``where``; None after ``ctx.reject``."""
    meta = record.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        ctx.reject(f"meta must be an object, got {type(meta).__name__}", where, 'use "meta": {...}')
        return None
    meta = dict(meta)
    if "tags" in meta and not (isinstance(meta["tags"], list) and all(map(_is_str, meta["tags"]))):
        ctx.reject("meta.tags must be a list of strings", where, 'e.g. "tags": ["support"]')
        return None
    if "split" in meta and meta["split"] is not None and meta["split"] not in SPLITS:
        ctx.reject(
            f"meta.split is {meta['split']!r}",
            where,
            'use "train", "val" or "test", or leave it out',
        )
        return None
    if "source" in meta and not isinstance(meta["source"], str):
        ctx.reject("meta.source must be a string", where, "describe where the record came from")
        return None
    if "source" in meta:
        meta["location"] = where  # the record's own file:line, for messages (duplicate ids)
    else:
        meta["source"] = where
    return meta
