"""Property tests for every source: serialise-then-read gives the same examples, none lost or
duplicated, in order."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from helpers import read_context, write_jsonl, write_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lorakit.contracts import Example, Message
from lorakit.data.paths import reporting_skips
from lorakit.errors import DataError
from lorakit_plugins.sources.chat_jsonl import ChatJsonlOptions, ChatJsonlSource
from lorakit_plugins.sources.instruction_jsonl import (
    InstructionJsonlOptions,
    InstructionJsonlSource,
    content_id,
)
from lorakit_plugins.sources.markdown import MarkdownOptions, MarkdownSource
from lorakit_plugins.sources.report_json import ReportJsonOptions, ReportJsonSource

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)
nonblank = text.filter(lambda s: s.strip())
ids = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12)


@st.composite
def chat_examples(draw):
    out = []
    for rid in draw(st.lists(ids, unique=True, max_size=8, min_size=1)):
        msgs = [Message("system", draw(text))] if draw(st.booleans()) else []
        for _ in range(draw(st.integers(1, 3))):
            msgs += [Message("user", draw(text)), Message("assistant", draw(nonblank))]
        meta = {"tags": draw(st.lists(ids, max_size=2))}
        if draw(st.booleans()):
            meta["split"] = draw(st.sampled_from(["train", "val", "test"]))
        out.append(Example(id=rid, messages=tuple(msgs), meta=meta))
    return out


def read(source, tmp_path):
    return list(source.read(read_context(tmp_path)))


@SETTINGS
@given(examples=chat_examples())
def test_chat_jsonl_round_trip(examples, tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [ex.to_json() for ex in examples])
    got = read(ChatJsonlSource(ChatJsonlOptions(path="c.jsonl")), tmp_path)
    assert [(g.id, g.messages) for g in got] == [(e.id, e.messages) for e in examples]
    for g, e in zip(got, examples, strict=True):
        assert {k: g.meta[k] for k in e.meta} == e.meta
        assert g.meta["source"].startswith(str(tmp_path / "c.jsonl"))


records = st.fixed_dictionaries(
    {"instruction": nonblank, "output": nonblank},
    optional={"input": text, "system": text, "meta": st.just({"tags": ["t"]})},
)


@SETTINGS
@given(recs=st.lists(records, max_size=8, min_size=1))
def test_instruction_jsonl_maps_every_record_in_order(recs, tmp_path):
    write_jsonl(tmp_path / "i.jsonl", recs)
    ctx = read_context(tmp_path, on_error="skip")
    got = list(InstructionJsonlSource(InstructionJsonlOptions(path="i.jsonl")).read(ctx))
    assert len(got) == len(recs) and not ctx.report.skipped
    for g, r in zip(got, recs, strict=True):
        inp = r.get("input") or ""
        assert g.id == content_id(r["instruction"], inp, r["output"], r.get("system") or "")
        user = r["instruction"] + ("\n\n" + inp if inp else "")
        want = ([Message("system", r["system"])] if r.get("system") else []) + [
            Message("user", user),
            Message("assistant", r["output"]),
        ]
        assert list(g.messages) == want


def test_instruction_ids_are_stable_and_explicit_ids_win(tmp_path):
    write_jsonl(
        tmp_path / "i.jsonl",
        [{"instruction": "a", "output": "b"}, {"id": "mine", "instruction": "a", "output": "c"}],
    )
    got = read(InstructionJsonlSource(InstructionJsonlOptions(path="i.jsonl")), tmp_path)
    assert got[0].id.startswith("sha-") and len(got[0].id) == 20
    assert got[0].id == content_id("a", "", "b") and got[1].id == "mine"


def test_instruction_ids_tell_system_prompts_apart_and_keep_the_ids_they_had(tmp_path, cli):
    # the same instruction and output under two system prompts: reported as duplicate ids
    recs = [{"instruction": "a", "output": "b", "system": s} for s in ("Be terse.", "Be kind.")]
    write_jsonl(tmp_path / "i.jsonl", [{"instruction": "a", "output": "b"}, *recs])
    got = read(InstructionJsonlSource(InstructionJsonlOptions(path="i.jsonl")), tmp_path)
    assert got[0].id == "sha-2d8dbcddf40617a6"  # as before: a record without a system prompt
    assert len({g.id for g in got}) == 3
    # identical records: their ids collide; the fix is an "id" field, not "rename one"
    write_jsonl(tmp_path / "i.jsonl", [recs[0], recs[0]])
    source = {"plugin": "instruction_jsonl", "path": "i.jsonl"}
    code, _, err = cli("check", str(write_recipe(tmp_path, [source])))
    assert code == 2 and "duplicate id 'sha-" in err and 'add an "id" field' in err, err
    assert "rename one" not in err


md_text = st.text(alphabet="abc XY#\n.-*", min_size=1, max_size=200).filter(lambda s: s.strip())
scalars = st.one_of(st.text("abc xyz0-:#'\"[", max_size=10), st.integers(), st.booleans())
front = st.dictionaries(
    st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True).filter(lambda k: k not in ("split",)),
    st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.just("k"), scalars)),
    max_size=3,
)


@SETTINGS
@given(docs=st.lists(st.tuples(md_text, front), min_size=1, max_size=5))
def test_markdown_round_trip_with_front_matter(docs, tmp_path):
    root = tmp_path / f"docs{len(list(tmp_path.iterdir()))}"
    for i, (body, fm) in enumerate(docs):
        (root / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        head = "---\n" + yaml.safe_dump(fm, sort_keys=False) + "---\n" if fm else ""
        (root / f"d{i % 2}" / f"n{i}.md").write_text(head + body, encoding="utf-8")
    got = read(MarkdownSource(MarkdownOptions(path=str(root))), tmp_path)
    want = sorted(
        ((f"d{i % 2}/n{i}.md", body, fm) for i, (body, fm) in enumerate(docs)), key=lambda t: t[0]
    )
    assert [g.id for g in got] == [w[0] for w in want]
    for g, (_, body, fm) in zip(got, want, strict=True):
        if fm:
            assert g.text == body and g.meta["front_matter"] == fm
        else:  # without front matter the file is the text, byte for byte
            assert g.text == body
        assert g.meta["chunkable"] is True


def test_markdown_yaml_front_matter_as_static_site_generators_write_it(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "post.md").write_text(
        "---\n"
        "title: 'Setup: the basics'\n"
        "date: 2024-05-01\n"
        "tags:\n  - guide\n  - setup\n"
        "author:\n  name: Ada\n  links: [a, b]\n"
        "draft: false\n"
        "---\n"
        "Body.\n"
    )
    (tmp_path / "docs" / "one_tag.md").write_text("---\ntags: solo\n---\nText.\n")
    one, post = read(MarkdownSource(MarkdownOptions(path="docs")), tmp_path)  # sorted by path
    assert post.text == "Body.\n"
    assert post.meta["front_matter"] == {
        "title": "Setup: the basics",
        "date": "2024-05-01",  # JSON-safe: the split files are JSON
        "tags": ["guide", "setup"],
        "author": {"name": "Ada", "links": ["a", "b"]},
        "draft": False,
    }
    assert post.meta["tags"] == ["guide", "setup"]
    assert one.meta["tags"] == ["solo"]
    saved = json.loads(json.dumps(post.to_json()))  # the split files are JSON: must survive it
    assert saved["meta"]["front_matter"] == post.meta["front_matter"]


def test_markdown_include_exclude_and_front_matter_meta(tmp_path):
    (tmp_path / "docs" / "drafts").mkdir(parents=True)
    (tmp_path / "docs" / "a.md").write_text("---\ntags: [x, y]\nsplit: val\n---\n# A\n")
    (tmp_path / "docs" / "drafts" / "b.md").write_text("# B\n")
    (tmp_path / "docs" / "c.txt").write_text("C")
    opts = MarkdownOptions(path="docs", exclude=("drafts/**",))
    (got,) = read(MarkdownSource(opts), tmp_path)
    assert got.id == "a.md" and got.text == "# A\n"
    assert got.meta["tags"] == ["x", "y"] and got.meta["split"] == "val"


@pytest.mark.parametrize("pattern", ["drafts", "drafts/**", "**/drafts/**", "drafts/"])
def test_markdown_exclude_skips_a_folder_at_every_depth(tmp_path, pattern):
    # pathlib's match read ** as one folder: drafts/sub/d.md was trained on, without a word
    for rel in ("a.md", "drafts/d.md", "drafts/sub/d.md", "x/drafts/sub/deep/d.md", "mydrafts.md"):
        (tmp_path / "docs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "docs" / rel).write_text(f"# {rel}\n")
    got = read(MarkdownSource(MarkdownOptions(path="docs", exclude=(pattern,))), tmp_path)
    assert sorted(e.id for e in got) == ["a.md", "mydrafts.md"]


def test_markdown_reads_folders_behind_links_and_reports_what_it_skips(tmp_path):
    (tmp_path / "outside" / "linked").mkdir(parents=True)
    (tmp_path / "outside" / "linked" / "l.md").write_text("# L\n")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n")
    (docs / "linkdir").symlink_to(tmp_path / "outside" / "linked")
    (docs / "loop").symlink_to(docs)  # back to a folder already read
    (docs / "dangling.md").symlink_to(tmp_path / "nowhere.md")
    lines: list[str] = []
    with reporting_skips(lines.append):  # the data report's warnings in a real read
        got = read(MarkdownSource(MarkdownOptions(path="docs")), tmp_path)
    assert sorted(e.id for e in got) == ["a.md", "linkdir/l.md"]
    skipped = "\n".join(lines)
    assert "dangling.md: a symbolic link to nothing" in skipped
    assert "loop: a folder already read" in skipped


@pytest.mark.parametrize("glob", ["", "/etc/*"])
def test_an_empty_or_absolute_glob_is_refused_by_name(tmp_path, glob):
    write_jsonl(tmp_path / "data" / "a.jsonl", [])
    with pytest.raises(DataError, match=r"pattern .* is (empty|absolute)") as err:
        read(ChatJsonlSource(ChatJsonlOptions(path="data", glob=glob)), tmp_path)
    assert err.value.where == "[data.sources].glob"


sections = st.dictionaries(
    st.from_regex(r"[A-Z]{2,12}", fullmatch=True),
    nonblank.filter(lambda s: "###" not in s),
    min_size=1,
    max_size=5,
)


@SETTINGS
@given(reports=st.lists(sections, min_size=1, max_size=4))
def test_report_json_round_trip(reports, tmp_path):
    folder = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    for i, secs in enumerate(reports):
        body = {
            "id": f"rep{i}",
            "sections": {k: {"original": "o", "improved": v} for k, v in secs.items()},
        }
        (folder / f"{i:03d}.json").write_text(json.dumps(body), encoding="utf-8")
    got = read(ReportJsonSource(ReportJsonOptions(path=str(folder))), tmp_path)
    assert [g.id for g in got] == [f"rep{i}" for i in range(len(reports))]
    for g, secs in zip(got, reports, strict=True):
        kept = {k: v for k, v in secs.items() if v.strip()}
        assert g.text == "".join(f"### {k}:\n{v}\n\n" for k, v in kept.items())
        # ...and the text parses back into the same sections, in document order.
        parts = re.split(r"(?:^|\n\n)### ([A-Z]+):\n", g.text)
        names = parts[1::2]
        assert names == list(kept)


def test_report_json_section_selection_top_level_and_arrays(tmp_path):
    reps = [
        {"id": "a", "INTRODUCTION": "intro", "RESULTS": {"improved": "res"}, "OTHER": "x"},
        {"id": "b", "RESULTS": "only"},
    ]
    (tmp_path / "all.json").write_text(json.dumps(reps))
    opts = ReportJsonOptions(path="all.json", sections_key="", sections=("results", "INTRODUCTION"))
    got = read(ReportJsonSource(opts), tmp_path)
    assert [g.text for g in got] == [
        "### INTRODUCTION:\nintro\n\n### RESULTS:\nres\n\n",
        "### RESULTS:\nonly\n\n",
    ]


def test_example_data_folder_reads(tmp_path):
    data = Path(__file__).resolve().parents[1] / "examples" / "data"
    assert len(read(MarkdownSource(MarkdownOptions(path=str(data / "markdown"))), tmp_path)) >= 3
    assert len(read(ReportJsonSource(ReportJsonOptions(path=str(data / "reports"))), tmp_path)) >= 3
    ins = InstructionJsonlSource(InstructionJsonlOptions(path=str(data / "instructions.jsonl")))
    assert len(read(ins, tmp_path)) >= 10
    assert (
        len(read(ChatJsonlSource(ChatJsonlOptions(path=str(data / "chat.jsonl"))), tmp_path)) >= 10
    )
