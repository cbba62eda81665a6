"""Shared by the conversation sources (chat_jsonl, sharegpt, hf_dataset): the optional turn
fields of the chat contract (tool calls, reasoning, tool results), a source-wide tools file, and
the last check of a built example, so a bad record is a ``file:line`` error, not a plugin bug.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorakit.api import (
    DataError,
    Example,
    JsonRefused,
    Message,
    SourceContext,
    example_problem,
    loads_strict,
    resolve_path,
    tool_calls_from_json,
    tools_from_json,
)

# The message keys of the chat contract besides role and content.
TURN_EXTRAS = ("tool_calls", "reasoning_content", "tool_call_id", "name")


def turn_message(role: str, content: str, turn: Mapping[str, Any], i: int) -> Message | str:
    """A ``Message`` with the optional fields ``turn`` holds, or what is wrong with them."""
    calls: Any = turn.get("tool_calls")
    try:
        calls = tool_calls_from_json(calls, f"messages[{i}].tool_calls") if calls else ()
    except ValueError as exc:
        return str(exc)
    reasoning = turn.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        return f"messages[{i}].reasoning_content must be a string"
    for key in ("tool_call_id", "name"):
        if not isinstance(turn.get(key) or "", str):
            return f"messages[{i}].{key} must be a string"
    return Message(
        role,
        content,
        tool_calls=calls,
        reasoning_content=reasoning,
        tool_call_id=turn.get("tool_call_id") or "",
        name=turn.get("name") or "",
    )


def record_tools(value: Any, where: str, ctx: SourceContext) -> tuple[Any, bool]:
    """``(tools or None, ok)`` from a record's ``tools`` value (a list or a JSON string of one);
    not ok after ``ctx.reject``."""
    if value is None or value == "" or value == []:
        return None, True
    try:
        return tools_from_json(value), True
    except ValueError as exc:
        ctx.reject(
            str(exc),
            where,
            'write tools as [{"type": "function", "function": {"name", "description", '
            '"parameters"}}]',
        )
        return None, False


def tools_file(recipe_dir: Path, path: str) -> tuple[Any, ...] | None:
    """The tools a source's ``tools`` option names (a JSON file holding a list), or None."""
    if not path:
        return None
    file = resolve_path(recipe_dir, path)
    where = "[data.sources].tools"
    try:
        value = loads_strict(file.read_text(encoding="utf-8-sig"))  # a BOM is not JSON
    except JsonRefused as exc:
        raise DataError(
            f"the tools file {file}: refused JSON: {exc}", where=where, fix=exc.fix
        ) from None
    except OSError as exc:
        raise DataError(
            f"cannot read the tools file {file}: {exc.strerror or exc}",
            where=where,
            fix="point tools at a JSON file (relative to the recipe file)",
        ) from None
    except ValueError as exc:
        raise DataError(
            f"the tools file {file} is not JSON: {exc}", where=where, fix="fix the file"
        ) from None
    try:
        return tools_from_json(value, str(file))
    except ValueError as exc:
        raise DataError(
            str(exc), where=where, fix="the file holds a JSON list of tool definitions"
        ) from None


def checked_example(
    example: Example, where: str, ctx: SourceContext, meta_fix: str = ""
) -> Example | None:
    """``example``, or None after ``ctx.reject`` when it breaks the contract (an unknown tool,
    arguments against the schema, turns out of order, a bad meta value), with the fix for that
    kind of problem (``meta_fix``: the source's own, where meta does not come from a field)."""
    problem = example_problem(example)
    if problem:
        ctx.reject(problem, where, _fix_for(problem, meta_fix))
        return None
    return example


def _fix_for(problem: str, meta_fix: str) -> str:
    """The fix for a problem ``example_problem`` found, by what it is about."""
    if problem.startswith("meta"):
        return meta_fix or (
            'fix the record\'s "meta": split is train, val or test (or absent), tags a list of '
            "strings, values JSON data"
        )
    if problem.startswith("tools"):
        return (
            'write tools as [{"type": "function", "function": {"name", "description", '
            '"parameters"}}], each name once'
        )
    if ".tool_calls" in problem:
        return (
            "make the call name one of the example's tools with arguments its parameters "
            "schema accepts, or add the tool to the record's tools (or the source's tools file)"
        )
    return (
        "fix the record's turns (roles: system first, user/assistant alternating, tool results "
        "after an assistant turn with tool_calls)"
    )
