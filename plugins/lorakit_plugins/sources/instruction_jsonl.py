"""``instruction_jsonl``: Alpaca-style instruction records, one per line.

Schema: ``{"instruction": str, "input": str (optional), "output": str, "system": str
(optional), "id": str (optional), "meta": {...} (optional)}``. Each record becomes a
conversation: an optional system message, a user turn holding the instruction followed by
``input_separator`` and the input (when the input is not empty), and an assistant turn holding
the output.

Ids: the ``id`` field when present, else ``"sha-"`` + the first 16 hex digits of the SHA-256 of
the instruction, input and output, and the system prompt when there is one (NUL-separated). The
hash is stable across runs and machines, so identical records get identical ids and are reported
as duplicates. With ``strict = true``
(the default) fields outside the schema are an error; with false they are ignored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
from lorakit.api import (
    Example,
    Message,
    RegisterSource,
    SourceContext,
    expand_files,
    hookimpl,
    iter_json_lines,
    non_empty_path,
    option,
    parse_meta,
)

FIELDS = ("instruction", "input", "output", "system", "id", "meta")


def content_id(instruction: str, input_: str, output: str, system: str = "") -> str:
    # the system prompt only when there is one: ids of records without one stay as they were
    parts = (instruction, input_, output, system) if system else (instruction, input_, output)
    blob = "\0".join(parts).encode("utf-8")
    return "sha-" + hashlib.sha256(blob).hexdigest()[:16]


@attrs.frozen
class InstructionJsonlOptions:
    path: str = option(
        doc="a .jsonl file, or a folder of them (relative to the recipe file)",
        validator=non_empty_path,
    )
    glob: str = option("**/*.jsonl", doc="which files to read when path is a folder")
    input_separator: str = option("\n\n", doc="text between the instruction and the input")
    strict: bool = option(True, doc="fields outside the schema are an error (false: ignored)")


class InstructionJsonlSource:
    Options = InstructionJsonlOptions

    def __init__(self, options: InstructionJsonlOptions):
        self.options = options

    def read(self, ctx: SourceContext) -> Iterator[Example]:
        for file in expand_files(ctx.recipe_dir, self.options.path, self.options.glob, "path"):
            for where, record in iter_json_lines(file, ctx):
                example = self.parse(record, where, ctx)
                if example is not None:
                    yield example

    def parse(self, record: Any, where: str, ctx: SourceContext) -> Example | None:
        if not isinstance(record, Mapping):
            ctx.reject(
                f"expected a JSON object, got {type(record).__name__}",
                where,
                'each line is {"instruction": ..., "input": ..., "output": ...}',
            )
            return None
        unknown = set(record) - set(FIELDS)
        if unknown and self.options.strict:
            ctx.reject(
                f"unknown field(s) {', '.join(sorted(unknown))}",
                where,
                "instruction records hold instruction, input, output, system, id and meta "
                "(or set strict = false to ignore extra fields)",
            )
            return None
        for key in ("instruction", "output"):
            if key not in record:
                ctx.reject(f"missing field {key!r}", where, f'add "{key}": "..."')
                return None
        for key in ("instruction", "input", "output", "system"):
            value = record.get(key)
            if value is None and key in ("instruction", "output"):
                ctx.reject(f"{key} is null", where, f'give "{key}" text, or drop the record')
                return None
            if value is not None and not isinstance(value, str):
                ctx.reject(
                    f"{key} must be a string, got {type(value).__name__}", where, "use plain text"
                )
                return None
        instruction, output = record["instruction"], record["output"]
        input_ = record.get("input") or ""
        system = record.get("system") or ""
        if not instruction.strip():
            ctx.reject("empty instruction", where, "fill in the instruction or drop the record")
            return None
        if not output.strip():
            ctx.reject(
                "empty output (nothing to train on)", where, "fill in the output or drop the record"
            )
            return None
        rid = record.get("id")
        if rid is None:
            rid = content_id(instruction, input_, output, system)
        elif not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
            ctx.reject(
                "id must be a non-empty string", where, 'use "id": "unique-name" or leave it out'
            )
            return None
        meta = parse_meta(record, f"{where} (id {rid})", ctx)
        if meta is None:
            return None
        user = instruction + (self.options.input_separator + input_ if input_ else "")
        messages = [Message("system", system)] if system else []
        messages += [Message("user", user), Message("assistant", output)]
        return Example(id=str(rid), messages=tuple(messages), meta=meta)


@hookimpl
def lorakit_register_sources(register: RegisterSource) -> None:
    register("instruction_jsonl", InstructionJsonlSource)
