"""``sharegpt``: ShareGPT conversations, as the Hub, Axolotl and LLaMA-Factory hold them.

A record is ``{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}``,
in a JSONL file (one per line) or a JSON file (an array of them, or one record). The usual variants are read
too: ``messages`` instead of ``conversations``, ``role``/``content`` instead of
``from``/``value`` (found per record, or named in the options), a top-level ``system`` prompt
and ``tools`` list (LLaMA-Factory), ``function_call`` turns (a JSON call, or a list of calls)
and ``observation`` turns (the tool's result). Roles map through ``DEFAULT_ROLES`` plus the
recipe's ``roles`` table; a role mapped to ``"skip"`` is left out. Any other turn key is an
error, and so is an Axolotl ``weight`` that asks for anything but lorakit's own supervision
(every assistant turn, nothing else): the chat contract has no unsupervised assistant turn.

Ids: the record's ``id`` when present, else ``"sha-"`` + 16 hex digits of the SHA-256 of the
system prompt, the turns and the record's own tools when it has some (stable; identical
conversations collide and are reported as duplicates).
Problems name ``file:line`` (JSONL) or ``file[index]`` (a JSON array).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
from lorakit.api import (
    Example,
    JsonRefused,
    Message,
    RegisterSource,
    SourceContext,
    expand_files,
    hookimpl,
    iter_json_lines,
    loads_strict,
    non_empty_path,
    option,
    parse_meta,
    read_text_file,
    tool_calls_from_json,
)

from lorakit_plugins.sources._messages import (
    TURN_EXTRAS,
    checked_example,
    record_tools,
    tools_file,
    turn_message,
)

# ShareGPT speaker names -> contract roles ("function_call": an assistant turn of tool calls).
DEFAULT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
    "ipython": "tool",
    "function_call": "function_call",
}
MAX_LINE_BYTES = 16 * 2**20  # the longest first line read to tell JSONL from JSON
TARGETS = ("system", "user", "assistant", "tool", "function_call", "skip")
# Axolotl's per-turn "weight": 1 trains on the turn, 0 does not. lorakit trains on every
# assistant turn and nothing else, so a weight is read only where it says just that.
WEIGHT_FIX = (
    "lorakit trains on every assistant turn and on no other turn: remove the weight; to leave "
    "an assistant turn out of training, end the conversation before it (drop it and the turns "
    "after it, or split the record into one conversation per reply you want trained)"
)


def _roles(_inst: Any, _attr: Any, value: dict[str, str]) -> None:
    for name, target in value.items():
        if target not in TARGETS:
            raise ValueError(f"roles.{name} is {target!r}; map to one of {', '.join(TARGETS)}")


@attrs.frozen
class ShareGptOptions:
    path: str = option(
        doc="a .json/.jsonl file, or a folder of them (relative to the recipe file)",
        validator=non_empty_path,
    )
    glob: str = option("**/*.json*", doc="which files to read when path is a folder")
    conversations_key: str = option(
        "auto", doc='the list of turns ("auto": conversations, else messages)'
    )
    role_key: str = option("auto", doc='a turn\'s speaker ("auto": from, else role)')
    content_key: str = option("auto", doc='a turn\'s text ("auto": value, else content)')
    roles: dict[str, str] = option(
        attrs.Factory(dict),
        doc="speaker -> system/user/assistant/tool/function_call/skip, on top of the defaults "
        "(human, gpt, system, observation, function_call...)",
        validator=_roles,
    )
    system_key: str = option("system", doc="top-level field holding a system prompt")
    tools_key: str = option("tools", doc="top-level field holding the tools (a list or JSON)")
    id_key: str = option("id", doc="top-level field holding the id (absent: a content hash)")
    tools: str = option("", doc="a JSON file listing the tools of records without their own")
    merge_consecutive: bool = option(
        False, doc="join consecutive turns of the same speaker (false: such a record is an error)"
    )
    strict: bool = option(
        True,
        doc="a turn field besides the known ones is an error (false: ignored, e.g. the "
        "language/toxic annotations of WildChat; a weight is checked either way)",
    )
    format: Literal["auto", "json", "jsonl"] = option(
        "auto",
        doc='file format ("auto": .jsonl, or a first line that is a whole object, is JSONL; '
        "else one JSON document, an array or an object)",
    )


class ShareGptSource:
    Options = ShareGptOptions

    def __init__(self, options: ShareGptOptions):
        self.options = options
        self.roles = {**DEFAULT_ROLES, **options.roles}

    def read(self, ctx: SourceContext) -> Iterator[Example]:
        tools = tools_file(ctx.recipe_dir, self.options.tools)
        for file in expand_files(ctx.recipe_dir, self.options.path, self.options.glob, "path"):
            for where, record in self._records(file, ctx):
                example = self.parse(record, where, ctx, tools)
                if example is not None:
                    yield example

    def _records(self, file: Path, ctx: SourceContext) -> Iterator[tuple[str, Any]]:
        fmt = self.options.format
        if fmt == "auto":
            fmt = "jsonl" if file.suffix == ".jsonl" or _first_line_is_a_record(file) else "json"
        if fmt == "jsonl":
            yield from iter_json_lines(file, ctx)
            return
        text = read_text_file(file, ctx, "ShareGPT JSON")
        if text is None:
            return
        try:
            records = loads_strict(text)
        except (json.JSONDecodeError, JsonRefused) as exc:
            line = getattr(exc, "lineno", None)
            fix = getattr(exc, "fix", "fix the file, or write one record per line (.jsonl)")
            ctx.reject(f"malformed JSON: {exc}", f"{file}:{line}" if line else str(file), fix)
            return
        if not isinstance(records, list):
            records = [records]
        for i, record in enumerate(records):
            yield f"{file}[{i}]", record

    def parse(
        self, record: Any, where: str, ctx: SourceContext, tools: tuple[Any, ...] | None
    ) -> Example | None:
        opts = self.options
        if not isinstance(record, Mapping):
            ctx.reject(
                f"expected a JSON object, got {type(record).__name__}",
                where,
                'each record is {"conversations": [{"from": "human", "value": "..."}, ...]}',
            )
            return None
        key = opts.conversations_key
        if key == "auto":
            key = "conversations" if "conversations" in record else "messages"
        turns = record.get(key)
        if not isinstance(turns, list) or not turns:
            ctx.reject(
                f"{key} must be a non-empty list of turns",
                where,
                "set conversations_key to the field that holds the turns",
            )
            return None
        rid = record.get(opts.id_key)
        if rid is None:
            hashed = [record.get(opts.system_key), turns]
            if record.get(opts.tools_key) not in (None, "", []):  # ids without tools unchanged
                hashed.append(record[opts.tools_key])
            blob = json.dumps(hashed, sort_keys=True, default=str)
            rid = "sha-" + hashlib.sha256(blob.encode()).hexdigest()[:16]
        elif not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
            ctx.reject(f"{opts.id_key} must be a non-empty string", where, "or leave it out")
            return None
        where = f"{where} (id {rid})"
        messages = self._messages(record, turns, where, ctx)
        if messages is None:
            return None
        own, ok = record_tools(record.get(opts.tools_key), where, ctx)
        meta = parse_meta(record, where, ctx) if ok else None
        if meta is None:
            return None
        example = Example(id=str(rid), messages=tuple(messages), meta=meta, tools=own or tools)
        return checked_example(example, where, ctx)

    def _messages(
        self, record: Mapping[str, Any], turns: list[Any], where: str, ctx: SourceContext
    ) -> list[Message] | None:
        system = record.get(self.options.system_key)
        out: list[Message] = []
        if system is not None and not isinstance(system, str):
            ctx.reject(
                f"{self.options.system_key} must be a string, got {type(system).__name__}",
                where,
                "write the system prompt as text, or leave it out",
            )
            return None
        if system and system.strip():
            out.append(Message("system", system))
        for i, turn in enumerate(turns):
            message = self._turn(turn, i)
            if isinstance(message, tuple):
                ctx.reject(message[0], where, message[1])
                return None
            if message is None:
                continue
            prev = out[-1] if out else None
            if prev and prev.role == message.role and message.role in ("user", "assistant"):
                if not self.options.merge_consecutive:
                    ctx.reject(
                        f"turns {i - 1} and {i} are both {message.role} turns",
                        where,
                        "set merge_consecutive = true to join them, or fix the record",
                    )
                    return None
                message = attrs.evolve(
                    message,
                    content=prev.content + "\n\n" + message.content,
                    tool_calls=prev.tool_calls + message.tool_calls,
                )
                out.pop()
            out.append(message)
        return out

    def _turn(self, turn: Any, i: int) -> Message | tuple[str, str] | None:
        opts = self.options
        if not isinstance(turn, Mapping):
            return f"turn {i} must be an object", 'use {"from": "human", "value": "..."}'
        role_key = opts.role_key if opts.role_key != "auto" else _first(turn, "from", "role")
        content_key = (
            opts.content_key if opts.content_key != "auto" else _first(turn, "value", "content")
        )
        # a key with a null value is nothing written (Arrow fills other turns' keys with nulls)
        known = (role_key, content_key, *TURN_EXTRAS, "weight")
        unknown = sorted(str(k) for k, x in turn.items() if x is not None and k not in known)
        if unknown and opts.strict:
            return f"turn {i} has unknown field(s) {', '.join(unknown)}", (
                f"keep only {role_key} and {content_key} (plus tool_calls, reasoning_content, "
                "tool_call_id, name, weight); put the text in them, set role_key / content_key "
                "to the fields that hold it, or set strict = false to ignore the others"
            )
        speaker = turn.get(role_key)
        target = self.roles.get(speaker) if isinstance(speaker, str) else None
        if target is None:
            return (
                f"turn {i}: unknown speaker {speaker!r} (in {role_key!r})",
                f'map it in the source\'s roles table, e.g. roles = {{ "{speaker}" = "user" }}',
            )
        if target == "skip":
            return None
        weight = turn.get("weight")
        if weight is not None:
            trained = target in ("assistant", "function_call")
            if isinstance(weight, bool) or weight not in (0, 1) or bool(weight) != trained:
                what = "an assistant" if trained else f"a {target}"
                return f"turn {i}: weight {weight!r} on {what} turn", WEIGHT_FIX
        content = turn.get(content_key)
        if content is None:
            content = ""
        if target == "function_call":
            try:
                calls = tool_calls_from_json(content, f"turn {i} (function_call)")
            except ValueError as exc:
                return str(exc), 'write the call as {"name": "...", "arguments": {...}}'
            return Message("assistant", "", tool_calls=calls)
        if not isinstance(content, str):
            return f"turn {i}: {content_key} must be a string, got {type(content).__name__}", (
                "use plain text"
            )
        message = turn_message(target, content, turn, i)
        if isinstance(message, str):
            return message, "see the chat contract in docs/data.md"
        if message.role == "assistant" and not message.content.strip() and not message.tool_calls:
            # trained on, it teaches the model to answer with nothing
            return f"turn {i}: empty assistant reply", "fill in the reply or drop the record"
        return message


def _first_line_is_a_record(file: Path) -> bool:
    """Whether the first non-blank line is a whole JSON object (JSONL); not for an array or a
    document spread over lines, read as one JSON value. An empty file, or one that is not a
    regular file, counts as JSONL, whose reader reports it."""
    if not file.is_file():
        return True
    with file.open("rb") as f:
        for raw in iter(lambda: f.readline(MAX_LINE_BYTES), b""):
            line = raw.removeprefix(b"\xef\xbb\xbf").strip()  # a BOM, as the readers accept
            if not line:
                continue
            try:
                return isinstance(json.loads(line), dict)
            except (ValueError, RecursionError):  # also a line cut at the limit, not UTF-8
                return False
    return True


def _first(turn: Mapping[str, Any], *keys: str) -> str:
    return next((k for k in keys if k in turn), keys[0])


@hookimpl
def lorakit_register_sources(register: RegisterSource) -> None:
    register("sharegpt", ShareGptSource)
