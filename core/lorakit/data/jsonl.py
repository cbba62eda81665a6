"""Careful JSONL reading and the strict chat contract.

Errors name file and line and say what to do, instead of an opaque Arrow error deep in
``datasets``: gzip bytes, non-UTF-8, a JSON array where JSONL is expected, huge lines,
malformed JSON, wrong types, unknown or out-of-order roles, empty turns, duplicate keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lorakit.contracts import ROLES, Example, Message, SourceContext
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


def loads_strict(text: str, **kwargs: Any) -> Any:
    """``json.loads`` for untrusted data: strict JSON only, as a ``ValueError`` when refused.

    Refuses (``JsonRefused``, with a fix) NaN/Infinity, numbers over ``MAX_NUMBER_DIGITS``
    digits, nesting too deep to parse, and lone UTF-16 surrogates (``"\\ud800"``, which no
    file can store as UTF-8); malformed JSON raises ``json.JSONDecodeError`` as usual.
    """
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
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {dup!r}")
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
            if not text.strip():
                continue
            if lineno == 1 and text.lstrip().startswith("["):
                raise DataError(
                    "this is a JSON array, but JSONL (one JSON object per line) is expected",
                    where=where,
                    fix="convert it: jq -c '.[]' file.json > file.jsonl",
                )
            try:
                record = loads_strict(text, object_pairs_hook=_no_duplicate_keys)
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
                ctx.reject(f"malformed JSON: {exc}", where, "keep one value per key")
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
    if "split" in meta and meta["split"] not in ("train", "val", "test", None):
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


def parse_conversation(record: Any, where: str, ctx: SourceContext) -> Example | None:
    """Validate one chat record; return the Example, or None when it was skipped."""
    if not isinstance(record, Mapping):
        ctx.reject(
            f"expected a JSON object, got {type(record).__name__}",
            where,
            'each line is {"id": ..., "messages": [...]}',
        )
        return None
    unknown = set(record) - {"id", "messages", "meta"}
    if unknown:
        ctx.reject(
            f"unknown field(s) {', '.join(sorted(unknown))}",
            where,
            "chat_jsonl records hold only id, messages and meta (put extras in meta)",
        )
        return None
    rid = record.get("id")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
        ctx.reject("id must be a non-empty string", where, 'add "id": "unique-name" to the record')
        return None
    where = f"{where} (id {rid})"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        ctx.reject(
            "messages must be a non-empty list", where, 'e.g. "messages": [{"role": "user", ...}]'
        )
        return None
    parsed: list[Message] = []
    for i, m in enumerate(messages):
        problem = _message_problem(m, i, parsed)
        if problem:
            ctx.reject(problem[0], where, problem[1])
            return None
        parsed.append(Message(role=m["role"], content=m["content"]))
    if not any(m.role == "assistant" for m in parsed):
        what = "system-only" if all(m.role == "system" for m in parsed) else "no assistant turn"
        ctx.reject(
            f"conversation has {what}: nothing to train on",
            where,
            "add an assistant reply, or drop the record",
        )
        return None
    meta = parse_meta(record, where, ctx)
    if meta is None:
        return None
    return Example(id=str(rid), messages=tuple(parsed), meta=meta)


def _message_problem(m: Any, i: int, before: list[Message]) -> tuple[str, str] | None:
    if not isinstance(m, Mapping):
        return f"messages[{i}] must be an object", 'use {"role": "user", "content": "..."}'
    extra = set(m) - {"role", "content"}
    if extra:
        return (
            f"messages[{i}] has unknown field(s) {', '.join(sorted(extra))}",
            "keep only role and content",
        )
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        return (
            f"messages[{i}].role is {role!r}",
            "roles are system, user and assistant (map tool/function turns before training)",
        )
    if not isinstance(content, str):
        return (
            f"messages[{i}].content must be a string, got {type(content).__name__}",
            "use plain text content",
        )
    if role == "system" and i != 0:
        return f"messages[{i}]: a system message may only come first", "move it to the start"
    prev = before[-1].role if before else None
    if role == "assistant" and prev != "user":
        return (
            f"messages[{i}]: assistant turn must follow a user turn (after {prev or 'nothing'})",
            ("roles must alternate user/assistant after an optional system message"),
        )
    if role == "user" and prev == "user":
        return (
            f"messages[{i}]: two user turns in a row",
            "merge them, or add the assistant reply between",
        )
    if role == "assistant" and not content.strip():
        return f"messages[{i}]: empty assistant turn", "fill in the reply or drop the record"
    return None
