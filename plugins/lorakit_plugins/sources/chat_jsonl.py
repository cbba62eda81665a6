"""``chat_jsonl``: one conversation per line.

Contract: ``{"id": str, "messages": [{"role": "system"|"user"|"assistant"|"tool", "content":
str}], "tools": [...], "meta": {"source": str, "tags": [str], "split": "train"|"val"|"test"}}``;
``tools`` and ``meta`` and its keys are optional. An assistant message may add ``tool_calls``
and ``reasoning_content``, a tool message ``tool_call_id`` and ``name`` (the OpenAI message
format). Every line is checked strictly; problems name the file and line.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import attrs
from lorakit.api import (
    ROLES,
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

from lorakit_plugins.sources._messages import (
    TURN_EXTRAS,
    checked_example,
    record_tools,
    tools_file,
    turn_message,
)


@attrs.frozen
class ChatJsonlOptions:
    path: str = option(
        doc="a .jsonl file, or a folder of them (relative to the recipe file)",
        validator=non_empty_path,
    )
    glob: str = option("**/*.jsonl", doc="which files to read when path is a folder")
    tools: str = option(
        "", doc="a JSON file listing the tools of every conversation without its own tools"
    )


class ChatJsonlSource:
    Options = ChatJsonlOptions

    def __init__(self, options: ChatJsonlOptions):
        self.options = options

    def read(self, ctx: SourceContext) -> Iterator[Example]:
        tools = tools_file(ctx.recipe_dir, self.options.tools)
        for file in expand_files(ctx.recipe_dir, self.options.path, self.options.glob, "path"):
            for where, record in iter_json_lines(file, ctx):
                example = parse_conversation(record, where, ctx, tools)
                if example is not None:
                    yield example


def parse_conversation(
    record: Any, where: str, ctx: SourceContext, tools: tuple[Any, ...] | None = None
) -> Example | None:
    """Validate one chat record; return the Example, or None when it was skipped."""
    if not isinstance(record, Mapping):
        ctx.reject(
            f"expected a JSON object, got {type(record).__name__}",
            where,
            'each line is {"id": ..., "messages": [...]}',
        )
        return None
    unknown = set(record) - {"id", "messages", "tools", "meta"}
    if unknown:
        ctx.reject(
            f"unknown field(s) {', '.join(sorted(unknown))}",
            where,
            "chat_jsonl records hold only id, messages, tools and meta (put extras in meta)",
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
        message = turn_message(m["role"], m.get("content") or "", m, i)
        if isinstance(message, str):
            ctx.reject(message, where, "see the chat contract in docs/data.md")
            return None
        parsed.append(message)
    if not any(m.role == "assistant" for m in parsed):
        what = "system-only" if all(m.role == "system" for m in parsed) else "no assistant turn"
        ctx.reject(
            f"conversation has {what}: nothing to train on",
            where,
            "add an assistant reply, or drop the record",
        )
        return None
    own, ok = record_tools(record.get("tools"), where, ctx)
    meta = parse_meta(record, where, ctx) if ok else None
    if meta is None:
        return None
    example = Example(id=str(rid), messages=tuple(parsed), meta=meta, tools=own or tools)
    return checked_example(example, where, ctx)


def _message_problem(m: Any, i: int, before: list[Message]) -> tuple[str, str] | None:
    if not isinstance(m, Mapping):
        return f"messages[{i}] must be an object", 'use {"role": "user", "content": "..."}'
    extra = set(m) - {"role", "content", *TURN_EXTRAS}
    if extra:
        return (
            f"messages[{i}] has unknown field(s) {', '.join(sorted(extra))}",
            "keep only role and content (plus tool_calls, reasoning_content, tool_call_id, name)",
        )
    role, content = m.get("role"), m.get("content")
    if content is None and m.get("tool_calls"):
        content = ""  # the OpenAI format writes null content beside tool calls
    if role not in ROLES:
        return (
            f"messages[{i}].role is {role!r}",
            "roles are system, user, assistant and tool (map other names before training)",
        )
    if not isinstance(content, str):
        return (
            f"messages[{i}].content must be a string, got {type(content).__name__}",
            "use plain text content",
        )
    if role == "system" and i != 0:
        return f"messages[{i}]: a system message may only come first", "move it to the start"
    prev = before[-1] if before else None
    if role == "assistant" and (prev.role if prev else None) not in ("user", "tool"):
        return (
            f"messages[{i}]: assistant turn must follow a user turn "
            f"(after {prev.role if prev else 'nothing'})",
            ("roles must alternate user/assistant after an optional system message"),
        )
    if role == "user" and prev and prev.role == "user":
        return (
            f"messages[{i}]: two user turns in a row",
            "merge them, or add the assistant reply between",
        )
    if role == "tool" and not (prev and (prev.role == "tool" or prev.tool_calls)):
        return (
            f"messages[{i}]: a tool result must follow an assistant turn with tool_calls",
            'give the assistant turn before it "tool_calls", or drop the tool turn',
        )
    if role == "assistant" and not content.strip() and not m.get("tool_calls"):
        return f"messages[{i}]: empty assistant turn", "fill in the reply or drop the record"
    return None


@hookimpl
def lorakit_register_sources(register: RegisterSource) -> None:
    register("chat_jsonl", ChatJsonlSource)
