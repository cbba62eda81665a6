"""The chat contract's tool messages, assistant tool calls (checked against the tools' JSON
schemas) and reasoning: read by chat_jsonl, kept by the split files, refused when broken."""

from __future__ import annotations

import json

import pytest
from helpers import read_context, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lorakit.contracts import Example, Message, ToolCall
from lorakit.data.splits import content_key
from lorakit.data.spool import example_from_json
from lorakit.data.tools import schema_problem, tool_calls_from_json, tools_from_json
from lorakit.data.validate import example_problem
from lorakit.errors import DataError
from lorakit_plugins.sources.chat_jsonl import ChatJsonlOptions, ChatJsonlSource

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TOOLS = (WEATHER,)


def agent_turns(args: dict, reasoning: str | None = None) -> tuple[Message, ...]:
    return (
        Message("user", "Weather in Paris?"),
        Message(
            "assistant",
            "",
            tool_calls=(ToolCall("get_weather", args, id="c1"),),
            reasoning_content=reasoning,
        ),
        Message("tool", '{"temp": 21}', tool_call_id="c1", name="get_weather"),
        Message("assistant", "It is 21 C in Paris."),
    )


def test_valid_agent_trace_passes_the_contract():
    ex = Example("a", agent_turns({"city": "Paris", "unit": "c"}, "Look it up."), tools=TOOLS)
    assert example_problem(ex) is None


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ({}, "lacks the required argument 'city'"),
        ({"city": 3}, "messages[1].tool_calls[0].arguments.city is 3, not of type string"),
        ({"city": "P", "unit": "k"}, "not one of"),
        ({"city": "P", "days": 0}, "beyond the minimum 1"),
        ({"city": "P", "when": "now"}, "an argument 'when' the tool does not take"),
    ],
)
def test_tool_call_arguments_are_checked_against_the_schema(args, problem):
    got = example_problem(Example("a", agent_turns(args), tools=TOOLS))
    assert got is not None and problem in got


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ((Message("user", "q"), Message("tool", "r")), "a tool result must follow"),
        (
            (Message("user", "q", tool_calls=(ToolCall("f"),)), Message("assistant", "a")),
            "only assistant turns carry tool_calls",
        ),
        (
            (Message("user", "q", tool_call_id="x"), Message("assistant", "a")),
            "only tool turns carry tool_call_id",
        ),
        (
            (Message("user", "q"), Message("assistant", "", tool_calls=(ToolCall("nope"),))),
            "calls 'nope', which is not among the example's tools (get_weather)",
        ),
    ],
)
def test_broken_turns_are_refused(messages, problem):
    got = example_problem(Example("a", messages, tools=TOOLS))
    assert got is not None and problem in got


def test_tools_are_normalized_and_refused_when_broken():
    bare = {"name": "f", "parameters": {"type": "object"}}
    assert tools_from_json([bare]) == ({"type": "function", "function": bare},)
    assert tools_from_json(json.dumps([bare])) == tools_from_json([bare])  # stored as a string
    with pytest.raises(ValueError, match="no function name"):
        tools_from_json([{"description": "x"}])
    dup = tools_from_json([bare, bare])
    assert "defined twice" in (example_problem(Example("a", agent_turns({}), tools=dup)) or "")
    text = Example("t", text="doc", tools=tools_from_json([bare]))
    assert "tools are for conversations" in (example_problem(text) or "")


def test_tool_call_forms_are_read_alike():
    openai = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    bare = {"name": "f", "arguments": {"x": 1}}
    assert tool_calls_from_json(openai) == (ToolCall("f", {"x": 1}, "c"),)
    assert tool_calls_from_json(bare) == (ToolCall("f", {"x": 1}),)
    with pytest.raises(ValueError, match="arguments must be a JSON object"):
        tool_calls_from_json({"name": "f", "arguments": "[1]"})


def test_schema_subset_keywords():
    schema = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer"}}]}
    assert schema_problem("x", schema, "v") is None
    assert schema_problem([1, 2], schema, "v") is None
    assert "none of the anyOf" in (schema_problem([1, "a"], schema, "v") or "")
    assert schema_problem(True, {"type": "integer"}, "v")  # a bool is not an integer
    assert schema_problem(2, {"type": "number"}, "v") is None


names = st.sampled_from(["get_weather", "search", "add"])
scalar = st.one_of(st.integers(-5, 5), st.text(max_size=5), st.booleans(), st.none())
arguments = st.dictionaries(st.sampled_from(["a", "b", "city"]), scalar, max_size=3)
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)


@st.composite
def agent_examples(draw):
    out = []
    for n in range(draw(st.integers(1, 5))):
        msgs: list[Message] = [Message("system", draw(text))] if draw(st.booleans()) else []
        for _ in range(draw(st.integers(1, 2))):
            msgs.append(Message("user", draw(text)))
            if draw(st.booleans()):
                calls = tuple(
                    ToolCall(draw(names), draw(arguments), id=f"c{k}")
                    for k in range(draw(st.integers(1, 2)))
                )
                reasoning = draw(st.one_of(st.none(), text))
                msgs.append(Message("assistant", "", calls, reasoning_content=reasoning))
                msgs += [Message("tool", draw(text), tool_call_id=c.id) for c in calls]
            msgs.append(Message("assistant", draw(text.filter(str.strip))))
        tools = tools_from_json([{"name": x} for x in ("get_weather", "search", "add")])
        out.append(Example(f"e{n}", tuple(msgs), meta={}, tools=tools))
    return out


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(examples=agent_examples())
def test_agent_traces_round_trip_through_chat_jsonl_and_split_files(examples, tmp_path):
    for ex in examples:
        assert example_problem(ex) is None
        again = example_from_json(json.loads(json.dumps(ex.to_json())))
        assert again == ex  # a split-file line reads back as the same example
    write_jsonl(tmp_path / "a.jsonl", [ex.to_json() for ex in examples])
    got = list(ChatJsonlSource(ChatJsonlOptions(path="a.jsonl")).read(read_context(tmp_path)))
    assert [(g.id, g.messages, g.tools) for g in got] == [
        (e.id, e.messages, e.tools) for e in examples
    ]


def test_tools_change_the_content_key_only_when_set():
    import hashlib

    import attrs

    plain = Example("a", (Message("user", "q"), Message("assistant", "a")))
    old = json.dumps({"messages": plain.to_json()["messages"], "text": None}, sort_keys=True)
    # tool-less data keeps the key (and so the split) it had before tools existed
    assert content_key(plain) == hashlib.sha256(old.encode()).hexdigest()
    assert content_key(plain) != content_key(attrs.evolve(plain, tools=TOOLS))


def test_chat_jsonl_reads_openai_tool_traces_and_a_source_tools_file(tmp_path):
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER]))
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    good = {
        "id": "ok",
        "messages": [
            {"role": "user", "content": "Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "3 C", "tool_call_id": "c1"},
            {"role": "assistant", "content": "3 C."},
        ],
    }
    bad = json.loads(json.dumps(good).replace('Oslo\\"', 'Oslo\\", \\"unit\\": \\"k\\"'))
    bad["id"] = "bad"
    write_jsonl(tmp_path / "a.jsonl", [good, bad])
    src = ChatJsonlSource(ChatJsonlOptions(path="a.jsonl", tools="tools.json"))
    ctx = read_context(tmp_path, on_error="skip")
    got = list(src.read(ctx))
    assert [g.id for g in got] == ["ok"] and got[0].tools == TOOLS
    assert got[0].messages[1].tool_calls == (ToolCall("get_weather", {"city": "Oslo"}, "c1"),)
    [(where, reason)] = ctx.report.skipped
    assert where.endswith("a.jsonl:2 (id bad)") and 'unit is "k", not one of' in reason
    with pytest.raises(DataError, match="not one of"):
        list(src.read(read_context(tmp_path)))
