"""The ``Example`` contract, enforced on every record a data source yields.

A source is plugin code, possibly a third party's: the core does not trust what it yields. Each
record is checked here before anything else sees it (splits, fingerprints, split files), so a
broken record is reported once, naming the plugin and the record, instead of crashing later
with a ``KeyError`` or writing a split file that cannot be read back.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from lorakit.contracts import ROLES, SPLITS, Example, Message
from lorakit.data.paths import reporting_skips
from lorakit.data.tools import tool_calls_problem, tools_problem
from lorakit.errors import LorakitError, PluginError

# Meta values are JSON (and TOML) data: a recipe's split files and reports hold them as strict
# JSON. Integers stay within TOML's 64-bit range; nesting stays shallow enough to read back.
MAX_META_DEPTH = 32
_INT_LIMIT = 2**63


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _value_problem(value: Any, path: str, depth: int = 0) -> str | None:
    if depth > MAX_META_DEPTH:
        return f"{path} is nested more than {MAX_META_DEPTH} levels deep"
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return None if _encodable(value) else f"{path} is not valid Unicode (a lone surrogate)"
    if isinstance(value, int):
        return None if -_INT_LIMIT <= value < _INT_LIMIT else f"{path} is out of 64-bit range"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} is {value} (JSON has no NaN/Infinity)"
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            problem = _value_problem(item, f"{path}[{i}]", depth + 1)
            if problem:
                return problem
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} has a key {key!r} that is not a string"
            problem = _value_problem(item, f"{path}.{key}", depth + 1)
            if problem:
                return problem
        return None
    return f"{path} is a {type(value).__name__}; meta values must be JSON data (str, int, float, bool, list, table)"


def _messages_problem(messages: Any, tools: Any = None) -> str | None:
    if not isinstance(messages, tuple) or not messages:
        return "messages must be a non-empty tuple of Message"
    for i, m in enumerate(messages):
        if not isinstance(m, Message):
            return f"messages[{i}] is a {type(m).__name__}, not a Message"
        if m.role not in ROLES:
            return f"messages[{i}].role is {m.role!r}; roles are {', '.join(ROLES)}"
        for field in ("content", "tool_call_id", "name"):
            value = getattr(m, field)
            if not isinstance(value, str):
                return f"messages[{i}].{field} is a {type(value).__name__}, not a string"
            if not _encodable(value):
                return f"messages[{i}].{field} is not valid Unicode (a lone surrogate)"
        problem = _turn_problem(m, i, messages[i - 1] if i else None, tools)
        if problem:
            return problem
    if not any(m.role == "assistant" for m in messages):
        return "the conversation has no assistant turn (nothing to learn)"
    return None


def _turn_problem(m: Message, i: int, prev: Message | None, tools: Any) -> str | None:
    """The order rules, and what only some roles may carry (tool calls, reasoning, call ids)."""
    before = prev.role if prev else None
    if m.role == "system" and i:
        return f"messages[{i}]: a system message may only come first"
    if m.role == "assistant" and before not in ("user", "tool"):
        return f"messages[{i}]: an assistant turn must follow a user turn (or a tool result)"
    if m.role == "user" and before == "user":
        return f"messages[{i}]: two user turns in a row"
    if m.role == "tool" and not (before == "tool" or (prev and prev.tool_calls)):
        return f"messages[{i}]: a tool result must follow an assistant turn with tool_calls"
    if m.role != "assistant" and (m.tool_calls or m.reasoning_content is not None):
        return f"messages[{i}]: only assistant turns carry tool_calls or reasoning_content"
    if m.role != "tool" and (m.tool_call_id or m.name):
        return f"messages[{i}]: only tool turns carry tool_call_id or name"
    reasoning = m.reasoning_content
    if reasoning is not None and not (isinstance(reasoning, str) and _encodable(reasoning)):
        return f"messages[{i}].reasoning_content must be a string of valid Unicode"
    problem = tool_calls_problem(m.tool_calls, tools, f"messages[{i}].tool_calls")
    if problem:
        return problem
    for j, call in enumerate(m.tool_calls):
        problem = _value_problem(dict(call.arguments), f"messages[{i}].tool_calls[{j}].arguments")
        if problem:
            return problem
    return None


def _meta_problem(meta: Any) -> str | None:
    if not isinstance(meta, Mapping):
        return f"meta is a {type(meta).__name__}, not a mapping"
    split = meta.get("split")
    if split is not None and split not in SPLITS:
        return f"meta.split is {split!r}; it must be one of {', '.join(SPLITS)} (or absent)"
    tags = meta.get("tags")
    if tags is not None and not (
        isinstance(tags, (list, tuple)) and all(isinstance(t, str) for t in tags)
    ):
        return "meta.tags must be a list of strings"
    if "source" in meta and not isinstance(meta["source"], str):
        return "meta.source must be a string (where the record came from: file:line)"
    if "chunkable" in meta and not isinstance(meta["chunkable"], bool):
        return "meta.chunkable must be true or false"
    return _value_problem(meta, "meta")


def example_problem(example: Any) -> str | None:
    """What is wrong with ``example`` under the ``Example`` contract, or None when nothing is.

    The rules: an ``Example`` instance; ``id`` a non-empty string; exactly one of ``messages``
    (a tuple of ``Message`` with roles system/user/assistant/tool and string content) or ``text``
    (a string), roles alternating user/assistant after an optional first system message, with at
    least one assistant turn; a ``tool`` result only after an assistant turn with ``tool_calls``
    (or another result), an assistant turn after a user turn or a tool result; ``tool_calls``
    and ``reasoning_content`` only on assistant turns; ``tools`` (conversations only) unique
    normalized definitions, every call naming one of them with arguments valid against its
    ``parameters`` schema; ``meta`` a mapping of JSON data (no NaN/Infinity, string keys, 64-bit integers)
    whose ``split`` is train/val/test or absent, ``tags`` a list of strings, ``source`` a string
    and ``chunkable`` a bool. A preference pair's ``rejected`` is one assistant ``Message``,
    non-empty and not the chosen turn (the last of ``messages``). An unpaired answer's
    ``label`` is a bool, on a conversation that ends with a non-empty assistant turn and has no
    ``rejected``.
    """
    if not isinstance(example, Example):
        return f"yielded a {type(example).__name__}, not a lorakit Example"
    if not isinstance(example.id, str) or not example.id:
        return f"id is {example.id!r}; it must be a non-empty string"
    if not _encodable(example.id):
        return "id is not valid Unicode (a lone surrogate)"
    if (example.messages is None) == (example.text is None):
        return "exactly one of messages or text must be set"
    if example.tools is not None:
        if example.messages is None:
            return "tools are for conversations; a text example has none"
        problem = tools_problem(example.tools) or _value_problem(list(example.tools), "tools")
        if problem:
            return problem
    if example.messages is not None:
        problem = _messages_problem(example.messages, example.tools)
        if problem:
            return problem
    elif not isinstance(example.text, str):
        return f"text is a {type(example.text).__name__}, not a string"
    elif not _encodable(example.text):
        return "text is not valid Unicode (a lone surrogate)"
    if example.rejected is not None:
        problem = _rejected_problem(example)
        if problem:
            return problem
    if example.label is not None:
        problem = _label_problem(example)
        if problem:
            return problem
    return _meta_problem(example.meta)


def _rejected_problem(example: Example) -> str | None:
    """A pair: ``messages`` ends with the chosen assistant turn, ``rejected`` is one assistant
    turn, non-empty, and not the chosen one."""
    if example.messages is None:
        return "rejected is set on a text example; a pair is a conversation"
    rejected = example.rejected
    if not isinstance(rejected, tuple) or len(rejected) != 1:
        return "rejected must be a tuple of one Message (the rejected assistant turn)"
    turn = rejected[0]
    if not isinstance(turn, Message) or turn.role != "assistant":
        return "rejected[0] must be an assistant Message"
    if not isinstance(turn.content, str) or not _encodable(turn.content):
        return "rejected[0].content must be valid Unicode text"
    chosen = example.messages[-1]
    if chosen.role != "assistant":
        return "a pair's messages must end with the chosen assistant turn"
    if not turn.content.strip() or not chosen.content.strip():
        return "a pair's chosen and rejected turns must both hold text"
    if turn.content == chosen.content:
        return "a pair's chosen and rejected turns are identical (nothing to prefer)"
    return None


def _label_problem(example: Example) -> str | None:
    """An unpaired answer: a bool label on a conversation ending with a non-empty assistant
    turn, and not a pair."""
    if not isinstance(example.label, bool):
        return f"label is {example.label!r}; it must be True (desirable) or False (undesirable)"
    if example.rejected is not None:
        return "label is set on a pair; an example is either a pair or a labelled answer"
    if not example.messages or example.messages[-1].role != "assistant":
        return "a labelled example's messages must end with the assistant answer it labels"
    if not example.messages[-1].content.strip():
        return "a labelled example's answer is empty"
    return None


def describe_record(example: Any) -> str:
    """Where a record came from, as well as it can be told: its ``meta.source`` and id."""
    meta = getattr(example, "meta", None)
    source = meta.get("source") if isinstance(meta, Mapping) else None
    rid = getattr(example, "id", None)
    parts = [_short(source)] if isinstance(source, str) and source else []
    if isinstance(rid, str) and rid:
        parts.append(f"id {_short(rid)!r}")
    return " ".join(parts) if parts else "(a record with no id or meta.source)"


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plugin_label(entry: Any) -> str:
    """``source plugin 'csv' (module lorakit_csv, package lorakit-csv 1.0)`` for messages."""
    package = f", package {entry.distribution} {entry.version}" if entry.distribution else ""
    return f"{entry.kind} plugin {entry.name!r} (module {entry.plugin}{package})"


def checked_records(
    read: Callable[[Any], Any], ctx: Any, entry: Any, key: str
) -> Iterator[Example]:
    """The records of ``read(ctx)`` (a source's ``read``), each checked against the contract.

    A record that breaks it, or a source that fails with anything but a lorakit error, is a
    ``PluginError`` naming the plugin (``entry``, a catalog entry), the recipe table ``key``
    and the record (its ``meta.source`` and id), or the last good record before the failure.
    """
    plugin = plugin_label(entry)
    fix = "this is a bug in the plugin: report it to its author with this message"
    last = "before its first record"
    # A FIFO, device or dangling link that expand_files skips in a data folder is a line in the
    # data report (ReadContext.report), not a silent omission.
    warnings = getattr(getattr(ctx, "report", None), "warnings", None)

    def skips() -> contextlib.AbstractContextManager[None]:
        if isinstance(warnings, list):
            return reporting_skips(warnings.append)
        return contextlib.nullcontext()

    try:
        with skips():
            iterator = iter(read(ctx))
    except TypeError as exc:
        raise PluginError(
            f"{plugin}: read() did not return an iterator", where=key, fix=fix
        ) from exc
    while True:
        try:
            with skips():
                ex = next(iterator)
        except StopIteration:
            return
        except LorakitError:
            raise
        except Exception as exc:  # a plugin's bug: name the plugin, keep the cause for --debug
            raise PluginError(
                f"{plugin} failed while reading ({type(exc).__name__}: {exc})",
                where=f"{key}, after {last}",
                fix=fix + " (--debug shows the traceback)",
            ) from exc
        problem = example_problem(ex)
        if problem:
            raise PluginError(
                f"{plugin} yielded a record that breaks the Example contract: {problem}",
                where=f"{key}: {describe_record(ex)}",
                fix="sources must pass bad records to ctx.reject(reason, where, fix); if the "
                "data is right, " + fix,
            )
        last = describe_record(ex)
        yield ex
