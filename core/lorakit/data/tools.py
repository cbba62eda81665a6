"""Tools and tool calls in the chat contract: read from JSON, and checked against the tools'
JSON schemas.

A conversation's ``tools`` list the functions its assistant may call, in the form chat templates
read (``{"type": "function", "function": {"name", "description", "parameters"}}``); a bare
``{"name", "description", "parameters"}`` is accepted and normalized to it. An assistant's
``tool_calls`` are ``ToolCall(name, arguments, id)``; arguments written as a JSON string (as
the OpenAI API returns them) are parsed into an object, which is what templates ``tojson``.

Arguments are checked against the tool's ``parameters`` schema with the JSON-schema keywords
function definitions use: ``type`` (one or a list), ``enum``, ``const``, ``properties``,
``required``, ``additionalProperties``, ``items``, ``anyOf``/``oneOf`` (at least one must
match), ``minimum``/``maximum``. Other keywords are not checked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from lorakit.contracts import Message, ToolCall

_TYPES: dict[str, Any] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, Mapping),
    "array": lambda v: isinstance(v, (list, tuple)),
    "null": lambda v: v is None,
}


def _json_value(value: Any, what: str) -> Any:
    """``value``, or the JSON a string holds (datasets often store tools as a JSON string)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{what} is a string that is not JSON ({exc})") from None
    return value


def tools_from_json(value: Any, what: str = "tools") -> tuple[Mapping[str, Any], ...]:
    """The normalized tools of a record's ``tools`` value (a list, or a JSON string of one);
    ``ValueError`` says what is wrong."""
    value = _json_value(value, what)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} must be a list of tool definitions, got {type(value).__name__}")
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, Mapping):
            raise ValueError(f"{what}[{i}] must be an object, got {type(tool).__name__}")
        if "function" in tool:
            fn = tool["function"]
            if tool.get("type", "function") != "function":
                raise ValueError(f"{what}[{i}].type is {tool.get('type')!r}; only 'function'")
        else:
            fn = tool
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{what}[{i}] has no function name")
        out.append({"type": "function", "function": dict(fn)})
    return tuple(out)


def tool_calls_from_json(value: Any, what: str = "tool_calls") -> tuple[ToolCall, ...]:
    """``ToolCall``s from the OpenAI form (``{"id", "type", "function": {"name", "arguments"}}``)
    or the bare one (``{"name", "arguments"}``); one object is a list of one."""
    value = _json_value(value, what)
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{what} must be a non-empty list of calls")
    calls = []
    for i, call in enumerate(value):
        if not isinstance(call, Mapping):
            raise ValueError(f"{what}[{i}] must be an object, got {type(call).__name__}")
        fn = call.get("function", call)
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{what}[{i}] has no function name")
        args = fn.get("arguments", fn.get("parameters", {}))
        args = _json_value(args, f"{what}[{i}].arguments")
        if args is None:
            args = {}
        if not isinstance(args, Mapping):
            raise ValueError(f"{what}[{i}].arguments must be a JSON object")
        cid = call.get("id", "")
        if not isinstance(cid, str):
            raise ValueError(f"{what}[{i}].id must be a string")
        calls.append(ToolCall(name=fn["name"], arguments=dict(args), id=cid))
    return tuple(calls)


def message_from_json(m: Mapping[str, Any]) -> Message:
    """A split file's message (``Message.to_json``) read back."""
    calls = m.get("tool_calls")
    return Message(
        m["role"],
        m["content"],
        tool_calls=tool_calls_from_json(calls) if calls else (),
        reasoning_content=m.get("reasoning_content"),
        tool_call_id=m.get("tool_call_id", ""),
        name=m.get("name", ""),
    )


def schema_problem(value: Any, schema: Any, path: str) -> str | None:
    """What makes ``value`` break ``schema`` (the keywords listed in the module doc), or None."""
    if not isinstance(schema, Mapping):
        return None
    # Keywords set to null count as absent (Arrow fills a struct's missing fields with null).
    schema = {k: x for k, x in schema.items() if x is not None}
    kind = schema.get("type")
    if kind is not None:
        kinds = [kind] if isinstance(kind, str) else list(kind)
        if not any(_TYPES.get(k, lambda v: True)(value) for k in kinds):
            return f"{path} is {json.dumps(value)[:60]}, not of type {'/'.join(kinds)}"
    if isinstance(schema.get("enum"), (list, tuple)) and value not in schema["enum"]:
        return f"{path} is {json.dumps(value)[:60]}, not one of {json.dumps(schema['enum'])[:80]}"
    if "const" in schema and value != schema["const"]:
        return f"{path} must be {json.dumps(schema['const'])[:60]}"
    for key, bad in (("minimum", lambda a, b: a < b), ("maximum", lambda a, b: a > b)):
        if key in schema and _TYPES["number"](value) and bad(value, schema[key]):
            return f"{path} is {value}, beyond the {key} {schema[key]}"
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        alternatives = options if isinstance(options, Sequence) else ()
        if alternatives and all(schema_problem(value, s, path) for s in alternatives):
            return f"{path} matches none of the {key} alternatives"
    if isinstance(value, Mapping):
        return _object_problem(value, schema, path)
    if isinstance(value, (list, tuple)) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            problem = schema_problem(item, schema["items"], f"{path}[{i}]")
            if problem:
                return problem
    return None


def _object_problem(value: Mapping[str, Any], schema: Mapping[str, Any], path: str) -> str | None:
    props = schema.get("properties")
    props = props if isinstance(props, Mapping) else {}
    for key in schema.get("required") or ():
        if key not in value:
            return f"{path} lacks the required argument {key!r}"
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in props:
            problem = schema_problem(item, props[key], f"{path}.{key}")
        elif extra is False:
            known = ", ".join(sorted(props)) or "none"
            problem = f"{path} has an argument {key!r} the tool does not take (it takes {known})"
        else:
            problem = schema_problem(item, extra, f"{path}.{key}")
        if problem:
            return problem
    return None


def tools_problem(tools: Any) -> str | None:
    """What is wrong with an ``Example.tools`` value (normalized form, unique names), or None."""
    if not isinstance(tools, tuple):
        return f"tools is a {type(tools).__name__}, not a tuple of tool definitions"
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or tool.get("type") != "function":
            return f'tools[{i}] is not {{"type": "function", "function": {{...}}}}'
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            return f"tools[{i}] has no function name"
        if name in seen:
            return f"tools[{i}]: the tool {name!r} is defined twice"
        seen.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            return f"tools[{i}] ({name}): parameters must be a JSON schema object"
    return None


def tool_calls_problem(
    calls: Any, tools: tuple[Mapping[str, Any], ...] | None, path: str
) -> str | None:
    """What is wrong with an assistant turn's ``tool_calls``: each a ``ToolCall`` with a name and
    a JSON-object ``arguments``; with ``tools``, a tool the example defines, with arguments
    valid against its ``parameters``."""
    if not isinstance(calls, tuple):
        return f"{path} is a {type(calls).__name__}, not a tuple of ToolCall"
    by_name = {t["function"]["name"]: t["function"] for t in tools or ()}
    for j, call in enumerate(calls):
        where = f"{path}[{j}]"
        if not isinstance(call, ToolCall):
            return f"{where} is a {type(call).__name__}, not a ToolCall"
        if not isinstance(call.name, str) or not call.name:
            return f"{where} has no function name"
        if not isinstance(call.arguments, Mapping):
            return f"{where}.arguments is a {type(call.arguments).__name__}, not an object"
        if not isinstance(call.id, str):
            return f"{where}.id must be a string"
        if tools is None:
            continue
        if call.name not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            return f"{where} calls {call.name!r}, which is not among the example's tools ({known})"
        problem = schema_problem(
            dict(call.arguments), by_name[call.name].get("parameters"), f"{where}.arguments"
        )
        if problem:
            return f"{problem} (tool {call.name!r})"
    return None
