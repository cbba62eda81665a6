"""The ``sharegpt`` source: every variant round trips, none lost or duplicated, in order; role
mapping; errors name file:line or file[index]."""

from __future__ import annotations

import json

import pytest
from helpers import read_context, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lorakit.api import read_source
from lorakit.contracts import Message, ToolCall
from lorakit.errors import DataError, RecipeError
from lorakit_plugins.sources.sharegpt import ShareGptOptions, ShareGptSource

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30)
nonblank = text.filter(lambda s: s.strip())
SPEAKERS = {"user": ["human", "user"], "assistant": ["gpt", "assistant", "chatgpt", "model"]}
VARIANTS = [("conversations", "from", "value"), ("messages", "role", "content")]


@st.composite
def conversations(draw):
    """(messages, system prompt or None): what a ShareGPT record should read as."""
    system = draw(st.one_of(st.none(), nonblank))
    msgs = [Message("system", system)] if system else []
    for _ in range(draw(st.integers(1, 3))):
        msgs += [Message("user", draw(text)), Message("assistant", draw(nonblank))]
    return msgs


def sharegpt_record(draw, msgs, variant, top_system):
    key, role_key, content_key = variant
    turns, record = [], {}
    for m in msgs:
        if m.role == "system" and top_system:
            record["system"] = m.content
            continue
        speaker = m.role if m.role == "system" else draw(st.sampled_from(SPEAKERS[m.role]))
        turns.append({role_key: speaker, content_key: m.content})
    record[key] = turns
    return record


@SETTINGS
@given(data=st.data(), convs=st.lists(conversations(), min_size=1, max_size=6))
def test_sharegpt_round_trip_every_variant(data, convs, tmp_path):
    variant = data.draw(st.sampled_from(VARIANTS))
    as_array = data.draw(st.booleans())
    records = []
    for i, msgs in enumerate(convs):
        rec = sharegpt_record(data.draw, msgs, variant, data.draw(st.booleans()))
        rec["id"] = f"r{i}"
        records.append(rec)
    folder = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    if as_array:
        (folder / "s.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    else:
        write_jsonl(folder / "s.jsonl", records)
    got = list(ShareGptSource(ShareGptOptions(path=str(folder))).read(read_context(tmp_path)))
    assert [g.id for g in got] == [r["id"] for r in records]
    assert [list(g.messages) for g in got] == convs
    want_where = "s.json[0]" if as_array else "s.jsonl:1"
    assert got[0].meta["source"].startswith(str(folder / want_where))


def test_content_hash_ids_and_duplicates(tmp_path):
    rec = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    write_jsonl(tmp_path / "s.jsonl", [rec, rec])
    got, _ = read_source(ShareGptSource, {"path": "s.jsonl"}, recipe_dir=tmp_path)
    assert got[0].id == got[1].id and got[0].id.startswith("sha-") and len(got[0].id) == 20
    assert got[0].id == "sha-aab7a093e4017777"  # the ids of records without tools stay as they were
    # the same turns with other tools are another record (it was a duplicate id)
    tools = [[{"name": f, "parameters": {"type": "object"}}] for f in ("add", "mul")]
    write_jsonl(tmp_path / "s.jsonl", [{**rec, "tools": t} for t in tools])
    got, _ = read_source(ShareGptSource, {"path": "s.jsonl"}, recipe_dir=tmp_path)
    assert len({g.id for g in got} | {"sha-aab7a093e4017777"}) == 3


def test_role_mapping_skip_and_merge(tmp_path):
    rec = {
        "conversations": [
            {"from": "narrator", "value": "(scene)"},
            {"from": "customer", "value": "hi"},
            {"from": "customer", "value": "anyone?"},
            {"from": "agent", "value": "hello"},
        ]
    }
    write_jsonl(tmp_path / "s.jsonl", [rec])
    with pytest.raises(DataError, match="unknown speaker 'narrator'") as err:
        read_source(ShareGptSource, {"path": "s.jsonl"}, recipe_dir=tmp_path)
    assert 'roles = { "narrator" = "user" }' in err.value.fix
    roles = {"narrator": "skip", "customer": "user", "agent": "assistant"}
    with pytest.raises(DataError, match="turns 1 and 2 are both user turns"):
        read_source(ShareGptSource, {"path": "s.jsonl", "roles": roles}, recipe_dir=tmp_path)
    opts = {"path": "s.jsonl", "roles": roles, "merge_consecutive": True}
    [ex], _ = read_source(ShareGptSource, opts, recipe_dir=tmp_path)
    assert ex.messages == (Message("user", "hi\n\nanyone?"), Message("assistant", "hello"))
    with pytest.raises(RecipeError, match="map to one of"):
        read_source(ShareGptSource, {"path": "s.jsonl", "roles": {"a": "bot"}}, recipe_dir=tmp_path)


def test_llama_factory_function_calls_observations_and_tools(tmp_path):
    tools = [{"name": "add", "parameters": {"type": "object", "required": ["a", "b"]}}]
    rec = {
        "conversations": [
            {"from": "human", "value": "2+3?"},
            {
                "from": "function_call",
                "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 3}}),
            },
            {"from": "observation", "value": "5"},
            {"from": "gpt", "value": "5"},
        ],
        "system": "You add.",
        "tools": json.dumps(tools),  # LLaMA-Factory stores the tools as a JSON string
    }
    bad = json.loads(json.dumps(rec).replace('\\"b\\": 3', '\\"c\\": 3'))
    (tmp_path / "s.json").write_text(json.dumps([rec, bad]), encoding="utf-8")
    got, skipped = read_source(
        ShareGptSource, {"path": "s.json"}, recipe_dir=tmp_path, on_error="skip"
    )
    [ex] = got
    assert ex.messages[0] == Message("system", "You add.")
    assert ex.messages[2].tool_calls == (ToolCall("add", {"a": 2, "b": 3}),)
    assert ex.messages[3] == Message("tool", "5")
    assert ex.tools[0]["function"]["name"] == "add"
    [(where, reason)] = skipped
    assert where.startswith(str(tmp_path / "s.json[1]")) and "required argument 'b'" in reason


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"conversations": []}, "conversations must be a non-empty list"),
        ({"conversations": [{"from": "gpt", "value": "a"}]}, "must follow a user turn"),
        ({"conversations": [{"from": "human", "value": 3}]}, "value must be a string, got int"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "no assistant turn"),
        ({"conversations": ["hi"]}, "turn 0 must be an object"),
        (  # trained on, an empty reply teaches the model to say nothing
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
            "turn 1: empty assistant reply",
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": None}]},
            "turn 1: empty assistant reply",
        ),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, record, message):
    write_jsonl(tmp_path / "s.jsonl", [record])
    with pytest.raises(DataError, match=message) as err:
        read_source(ShareGptSource, {"path": "s.jsonl"}, recipe_dir=tmp_path)
    assert err.value.where.startswith(f"{tmp_path / 's.jsonl'}:1")


def test_broken_json_array_names_the_line(tmp_path):
    (tmp_path / "s.json").write_text('[\n{"conversations": []},\n{oops}\n]', encoding="utf-8")
    with pytest.raises(DataError, match="malformed JSON") as err:
        read_source(ShareGptSource, {"path": "s.json"}, recipe_dir=tmp_path)
    assert err.value.where == f"{tmp_path / 's.json'}:3"


def test_fields_the_user_wrote_are_read_or_refused_never_ignored(tmp_path):
    q, a = {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}
    weight_fix = "lorakit trains on every assistant turn and on no other turn"
    cases = [  # each was read as if the field were not there
        ({"system": 5, "conversations": [q, a]}, "system must be a string, got int", "as text"),
        ({"conversations": [q, {**a, "weight": 0}]}, "weight 0 on an assistant turn", weight_fix),
        ({"conversations": [{**q, "weight": 1}, a]}, "turn 0: weight 1 on a user turn", weight_fix),
        ({"conversations": [q, {**a, "weight": 0.5}]}, "weight 0.5 on an assistant", weight_fix),
        (
            {"conversations": [q, {**a, "loss": False}]},
            r"turn 1 has unknown field\(s\) loss",
            "only",
        ),
    ]
    for record, message, fix in cases:
        write_jsonl(tmp_path / "s.jsonl", [record])
        with pytest.raises(DataError, match=message) as err:
            read_source(ShareGptSource, {"path": "s.jsonl"}, recipe_dir=tmp_path)
        assert err.value.where.startswith(f"{tmp_path / 's.jsonl'}:1") and fix in err.value.fix
    # a weight that says what lorakit does, or a null (OpenHermes writes "weight": null)
    turns = [{**q, "weight": 0}, {**a, "weight": 1}, {**q, "weight": None}, {**a, "weight": None}]
    write_jsonl(tmp_path / "s.jsonl", [{"system": None, "conversations": turns}])
    [ex], _ = read_source(ShareGptSource, {"path": "s.jsonl"}, recipe_dir=tmp_path)
    assert [m.role for m in ex.messages] == ["user", "assistant", "user", "assistant"]
    # strict = false: turn annotations (WildChat's) are ignored; a weight is still checked
    noted = {"language": "English", "toxic": False, "turn_identifier": 7}
    write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{**q, **noted}, {**a, **noted}]}])
    [ex], _ = read_source(ShareGptSource, {"path": "s.jsonl", "strict": False}, recipe_dir=tmp_path)
    assert ex.messages == (Message("user", "q"), Message("assistant", "a"))
    write_jsonl(tmp_path / "s.jsonl", [{"conversations": [q, {**a, "weight": 0}]}])
    with pytest.raises(DataError, match="weight 0 on an assistant turn"):
        read_source(ShareGptSource, {"path": "s.jsonl", "strict": False}, recipe_dir=tmp_path)


def test_auto_format_reads_a_pretty_printed_record_and_one_line_records(tmp_path):
    rec = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    # read as JSONL before: "one.json:1: malformed JSON: Expecting property name"
    (tmp_path / "one.json").write_text(json.dumps(rec, indent=2), encoding="utf-8")
    [ex], _ = read_source(ShareGptSource, {"path": "one.json"}, recipe_dir=tmp_path)
    assert ex.messages[1] == Message("assistant", "a")
    assert ex.meta["source"].startswith(f"{tmp_path / 'one.json'}[0]")
    (tmp_path / "lines.json").write_text(f"\n{json.dumps(rec)}\n{json.dumps(rec)}\n")
    got, _ = read_source(ShareGptSource, {"path": "lines.json"}, recipe_dir=tmp_path)
    assert [g.meta["source"].split(" ")[0] for g in got] == [
        f"{tmp_path / 'lines.json'}:2",
        f"{tmp_path / 'lines.json'}:3",
    ]
    (tmp_path / "array.json").write_text("\ufeff" + json.dumps([rec, rec]), encoding="utf-8")
    got, _ = read_source(ShareGptSource, {"path": "array.json"}, recipe_dir=tmp_path)
    assert len(got) == 2 and "array.json[1]" in got[1].meta["source"]
    (tmp_path / "bad.json").write_text('{\n  "conversations": [oops]\n}\n', encoding="utf-8")
    with pytest.raises(DataError, match="malformed JSON") as err:
        read_source(ShareGptSource, {"path": "bad.json"}, recipe_dir=tmp_path)
    assert err.value.where == f"{tmp_path / 'bad.json'}:2"


def test_the_fix_is_about_the_kind_of_problem(tmp_path):
    # every problem got the fix about message order, a tool call to an unknown tool too
    q, a = {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}
    call = {"from": "function_call", "value": json.dumps({"name": "mul", "arguments": {}})}
    tools = [{"name": "add", "parameters": {"type": "object"}}]
    cases = [  # (record, in the fix, not in it)
        (
            {"conversations": [q, call, {"from": "tool", "value": "1"}, a], "tools": tools},
            "one of the example's tools",
            "alternating",
        ),
        ({"conversations": [a]}, "user/assistant alternating", "tools"),
    ]
    for record, fix, not_fix in cases:
        write_jsonl(tmp_path / "s.jsonl", [record])
        with pytest.raises(DataError) as err:
            read_source(ShareGptSource, {"path": "s.jsonl"}, recipe_dir=tmp_path)
        assert fix in err.value.fix and not_fix not in err.value.fix, err.value
