"""The ``hf_dataset`` source: save_to_disk folders and parquet/arrow/CSV/JSON files read through
datasets' builders, streamed or not, give the same examples in order, none lost or duplicated;
errors name the row; the Hub fails fast offline with how to work offline; the data report has
the fingerprint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import read_context, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lorakit.api import read_source
from lorakit.contracts import Message
from lorakit.errors import DataError, RecipeError
from lorakit_plugins.sources.chat_jsonl import ChatJsonlOptions, ChatJsonlSource
from lorakit_plugins.sources.hf_dataset import HfDatasetOptions, HfDatasetSource

SHARED = Path("/work/shared/data/alpaca_seed_chat.jsonl")
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30)
nonblank = text.filter(lambda s: s.strip())


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    """datasets' Arrow cache in a throwaway folder, never the user's ~/.cache."""
    import datasets

    cache = tmp_path_factory.mktemp("hf-cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    datasets.disable_progress_bars()


@st.composite
def rows(draw):
    out = []
    for i in range(draw(st.integers(1, 6))):
        msgs = [{"role": "system", "content": draw(text)}] if draw(st.booleans()) else []
        for _ in range(draw(st.integers(1, 2))):
            msgs += [
                {"role": "user", "content": draw(text)},
                {"role": "assistant", "content": draw(nonblank)},
            ]
        out.append({"id": f"r{i}", "messages": msgs, "tag": draw(st.sampled_from(["a", "b"]))})
    return out


def write_as(kind: str, records: list[dict], folder: Path) -> dict:
    """The records in one storage kind; the source options that read them."""
    import datasets

    folder.mkdir(parents=True)
    ds = datasets.Dataset.from_list(records)
    if kind == "disk":
        ds.save_to_disk(str(folder / "saved"))
        return {"path": str(folder / "saved")}
    if kind == "parquet":
        ds.to_parquet(str(folder / "d.parquet"))
        return {"data_files": [str(folder / "*.parquet")]}
    write_jsonl(folder / "d.jsonl", records)
    return {"path": str(folder)}


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(records=rows(), kind=st.sampled_from(["disk", "parquet", "jsonl"]), stream=st.booleans())
def test_every_storage_round_trips_streamed_or_not(records, kind, stream, tmp_path):
    folder = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
    opts = {**write_as(kind, records, folder), "id_column": "id", "meta_columns": ["tag"]}
    got, _ = read_source(HfDatasetSource, {**opts, "streaming": stream}, recipe_dir=tmp_path)
    assert [g.id for g in got] == [r["id"] for r in records]
    for g, r in zip(got, records, strict=True):
        assert [m.to_json() for m in g.messages] == r["messages"]
        assert g.meta["tag"] == r["tag"] and "row" in g.meta["source"]


def test_prompt_response_columns_csv_and_tsv(tmp_path):
    (tmp_path / "a.csv").write_text('q,a,sys\n"Hi, you",Hello,Be brief\nWhy?,Because,\n')
    opts = {
        "path": "a.csv",
        "prompt_column": "q",
        "response_column": "a",
        "system_column": "sys",
        "assign_split": "val",
    }
    got, _ = read_source(HfDatasetSource, opts, recipe_dir=tmp_path)
    assert got[0].messages == (
        Message("system", "Be brief"),
        Message("user", "Hi, you"),
        Message("assistant", "Hello"),
    )
    assert got[1].messages == (Message("user", "Why?"), Message("assistant", "Because"))
    assert {g.meta["split"] for g in got} == {"val"} and got[0].id.startswith("sha-")
    (tmp_path / "b.tsv").write_text("q\ta\nx, y\tz\n")
    [ex], _ = read_source(
        HfDatasetSource, {**opts, "path": "b.tsv", "system_column": ""}, recipe_dir=tmp_path
    )
    assert ex.messages[0] == Message("user", "x, y")


def test_sharegpt_turns_text_rows_and_dataset_dict_splits(tmp_path):
    import datasets

    conv = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"conversations": conv}]),
            "validation": datasets.Dataset.from_list([{"conversations": conv, "doc": "t"}]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    opts = {"path": "dd", "split": "validation", "messages_column": "conversations"}
    [ex], _ = read_source(HfDatasetSource, opts, recipe_dir=tmp_path)
    assert ex.messages == (Message("user", "q"), Message("assistant", "a"))
    [doc], _ = read_source(HfDatasetSource, {**opts, "text_column": "doc"}, recipe_dir=tmp_path)
    assert doc.text == "t" and doc.messages is None
    with pytest.raises(DataError, match=r"has no split 'test' \(it has train, validation\)"):
        read_source(HfDatasetSource, {**opts, "split": "test"}, recipe_dir=tmp_path)


def test_bad_rows_name_the_row_and_missing_columns_list_the_columns(tmp_path):
    records = [
        {"prompt": "a", "response": "b"},
        {"prompt": "c", "response": " "},
        {"prompt": "e", "response": "f"},
    ]
    write_jsonl(tmp_path / "d.jsonl", records)
    opts = {"path": "d.jsonl", "prompt_column": "prompt", "response_column": "response"}
    with pytest.raises(DataError, match="response is empty") as err:
        read_source(HfDatasetSource, opts, recipe_dir=tmp_path)
    assert "d.jsonl[train] row 1" in err.value.where
    got, skipped = read_source(HfDatasetSource, opts, recipe_dir=tmp_path, on_error="skip")
    assert len(got) == 2 and len(skipped) == 1
    with pytest.raises(DataError, match=r"no column 'answer' \(columns: prompt, response\)"):
        read_source(HfDatasetSource, {**opts, "response_column": "answer"}, recipe_dir=tmp_path)
    with pytest.raises(RecipeError, match="exactly one of name"):
        read_source(HfDatasetSource, {**opts, "name": "org/x"}, recipe_dir=tmp_path)


def test_broken_data_file_is_one_clear_error(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"datasets could not read d\.parquet"):
        read_source(HfDatasetSource, {"path": "d.parquet"}, recipe_dir=tmp_path)


def test_hub_id_without_the_hub_fails_fast_saying_how_to_work_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    opts = {"name": "tatsu-lab/alpaca", "config": "default"}
    with pytest.raises(DataError, match="cannot reach the Hugging Face Hub") as err:
        read_source(HfDatasetSource, opts, recipe_dir=tmp_path)
    assert err.value.where == "[data.sources].name"
    assert "save_to_disk('alpaca')" in err.value.fix and "HF_HUB_OFFLINE=1" in err.value.fix


def test_fingerprint_and_rows_in_the_data_report(tmp_path):
    shutil.copy(SHARED, tmp_path / "seed.jsonl")  # a temp copy: datasets keys its cache on it
    ctx = read_context(tmp_path)
    ctx.source = "0:hf_dataset"
    src = HfDatasetSource(HfDatasetOptions(path="seed.jsonl", id_column="id"))
    got = list(src.read(ctx))
    facts = ctx.report.sources_info["0:hf_dataset"]
    assert facts["rows"] == len(got) == 175 and len(facts["fingerprint"]) == 16
    assert len(facts["rows_sha256"]) == 16
    assert "source 0:hf_dataset: dataset seed.jsonl[train]" in "\n".join(ctx.report.lines())
    assert "sources_info" in ctx.report.to_json()
    # the real data read through datasets is what chat_jsonl reads
    plain = list(ChatJsonlSource(ChatJsonlOptions(path="seed.jsonl")).read(read_context(tmp_path)))
    assert [(g.id, g.messages) for g in got] == [(p.id, p.messages) for p in plain]
    streamed = HfDatasetSource(HfDatasetOptions(path="seed.jsonl", id_column="id", streaming=True))
    ctx2 = read_context(tmp_path)
    assert [g.messages for g in streamed.read(ctx2)] == [p.messages for p in plain]
    facts2 = ctx2.report.sources_info["source"]
    assert facts2["rows_sha256"] == facts["rows_sha256"] and "fingerprint" not in facts2


def test_tools_stored_as_a_json_string_column(tmp_path):
    tools = json.dumps([{"name": "add", "parameters": {"type": "object", "required": ["a"]}}])
    call = json.dumps({"name": "add", "arguments": {"a": 1}})
    conv = [
        {"from": "human", "value": "1+?"},
        {"from": "function_call", "value": call},
        {"from": "observation", "value": "1"},
        {"from": "gpt", "value": "1"},
    ]
    write_jsonl(tmp_path / "t.jsonl", [{"conversations": conv, "tools": tools}])
    opts = {"path": "t.jsonl", "messages_column": "conversations"}
    [ex], _ = read_source(HfDatasetSource, opts, recipe_dir=tmp_path)
    assert ex.tools[0]["function"]["name"] == "add" and ex.messages[1].tool_calls[0].name == "add"


def test_a_system_or_tools_column_that_is_not_there_is_an_error(tmp_path):
    # the system prompt was silently the template's default, the tools silently none
    (tmp_path / "d.csv").write_text("q,a,sys\nWhat is 2+2?,four,Be terse.\n")
    opts = {"path": "d.csv", "prompt_column": "q", "response_column": "a"}
    for key in ("system_column", "tools_column"):
        with pytest.raises(DataError, match=r"has no column 'system' \(columns: q, a, sys\)"):
            read_source(HfDatasetSource, {**opts, key: "system"}, recipe_dir=tmp_path)
    # the default tools column is read only where it exists
    [ex], _ = read_source(HfDatasetSource, {**opts, "system_column": "sys"}, recipe_dir=tmp_path)
    assert ex.messages[0] == Message("system", "Be terse.") and ex.tools is None


def test_numbers_in_text_columns_are_read_as_written_from_csv_and_named_elsewhere(tmp_path):
    # pandas read the column as int64 ("a is empty or not text"), and would make 0.10 0.1
    (tmp_path / "d.csv").write_text("q,a,sys\nWhat is 2+2?,4,7\nAnd 1/10?,0.10,\nPad 7?,007,\n")
    opts = {"path": "d.csv", "prompt_column": "q", "response_column": "a", "system_column": "sys"}
    for stream in (False, True):
        got, _ = read_source(HfDatasetSource, {**opts, "streaming": stream}, recipe_dir=tmp_path)
        assert [[m.content for m in g.messages] for g in got] == [
            ["7", "What is 2+2?", "4"],
            ["And 1/10?", "0.10"],
            ["Pad 7?", "007"],
        ]
    (tmp_path / "t.csv").write_text("doc\n3.140\n")
    [doc], _ = read_source(
        HfDatasetSource, {"path": "t.csv", "text_column": "doc"}, recipe_dir=tmp_path
    )
    assert doc.text == "3.140"
    # a JSON number is what the user wrote: named with its type and how to write text
    write_jsonl(tmp_path / "j" / "d.jsonl", [{"q": "What is 2+2?", "a": 4}])
    with pytest.raises(DataError, match=r"a is an int, not text") as err:
        read_source(
            HfDatasetSource, {**opts, "path": "j", "system_column": ""}, recipe_dir=tmp_path
        )
    assert 'write it as a JSON string ("a": "...")' in err.value.fix
    write_jsonl(tmp_path / "k" / "d.jsonl", [{"doc": 2.5}])
    with pytest.raises(DataError, match=r"doc is a float, not text"):
        read_source(HfDatasetSource, {"path": "k", "text_column": "doc"}, recipe_dir=tmp_path)
    (tmp_path / "e.csv").write_text("q,a\nWhy?,NA\n")
    with pytest.raises(DataError, match=r"a is empty") as err:
        read_source(
            HfDatasetSource, {**opts, "path": "e.csv", "system_column": ""}, recipe_dir=tmp_path
        )
    assert "NA, N/A, null, None or NaN, as missing" in err.value.fix


def test_a_bad_meta_value_gets_a_fix_about_meta_columns(tmp_path):
    # the fix was about message order: "roles: system first, user/assistant alternating"
    (tmp_path / "d.csv").write_text("q,a,split\nhi,yo,validation\n")
    opts = {
        "path": "d.csv",
        "prompt_column": "q",
        "response_column": "a",
        "meta_columns": ["split"],
    }
    with pytest.raises(DataError, match=r"meta.split is 'validation'") as err:
        read_source(HfDatasetSource, opts, recipe_dir=tmp_path)
    assert "leave the column out of meta_columns" in err.value.fix and "roles" not in err.value.fix


def test_turn_annotations_of_hub_datasets_are_not_refused(tmp_path):
    """WildChat-shaped rows annotate every turn (language, toxic, turn_identifier): a Hub
    dataset is read wholesale, so those keys are ignored, not an error."""
    turn = {"language": "English", "toxic": False, "redacted": False, "turn_identifier": 1}
    row = {
        "conversation": [
            {"role": "user", "content": "hi", **turn},
            {"role": "assistant", "content": "hello", **turn},
        ]
    }
    write_jsonl(tmp_path / "w.jsonl", [row])
    opts = {"path": "w.jsonl", "messages_column": "conversation"}
    [ex], _ = read_source(HfDatasetSource, opts, recipe_dir=tmp_path)
    assert ex.messages == (Message("user", "hi"), Message("assistant", "hello"))
