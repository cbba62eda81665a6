"""Splits: disjoint, complete, deterministic, stable when data grows; meta.split honoured;
identical conversations never straddle splits; prepare writes them without claiming a run."""

from __future__ import annotations

import json

from helpers import write_jsonl, write_recipe
from hypothesis import given, settings
from hypothesis import strategies as st
from lorakit.contracts import Example, Message
from lorakit.data.splits import assign_splits, content_key

SETTINGS = settings(max_examples=50, deadline=None)


def ex(i: int, answer: str | None = None, split: str | None = None) -> Example:
    meta = {"split": split} if split else {}
    msgs = (Message("user", f"q{i}"), Message("assistant", answer or f"a{i}"))
    return Example(id=f"e{i}", messages=msgs, meta=meta)


pool = st.lists(st.integers(0, 10_000), unique=True, min_size=1, max_size=60)
fractions = st.tuples(st.floats(0, 0.45), st.floats(0, 0.45))


@SETTINGS
@given(nums=pool, seed=st.integers(0, 2**31), frac=fractions)
def test_splits_are_disjoint_complete_and_deterministic(nums, seed, frac):
    examples = [ex(i) for i in nums]
    parts = assign_splits(examples, seed, *frac)
    got = [e.id for name in ("train", "val", "test") for e in parts[name]]
    assert sorted(got) == sorted(e.id for e in examples)  # complete, nothing duplicated
    assert len(set(got)) == len(got)  # disjoint
    assert assign_splits(list(examples), seed, *frac) == parts  # deterministic


@SETTINGS
@given(nums=pool, more=pool, seed=st.integers(0, 2**31), frac=fractions)
def test_adding_examples_never_moves_existing_ones(nums, more, seed, frac):
    old = [ex(i) for i in nums]
    new = old + [ex(i) for i in more if i not in nums]
    before, after = assign_splits(old, seed, *frac), assign_splits(new, seed, *frac)
    where = {e.id: name for name, exs in after.items() for e in exs}
    for name, exs in before.items():
        assert all(where[e.id] == name for e in exs)


@SETTINGS
@given(nums=pool, seed=st.integers(0, 2**31), pinned=st.sampled_from(["train", "val", "test"]))
def test_meta_split_wins_and_identical_content_shares_a_split(nums, seed, pinned):
    examples = [ex(i) for i in nums] + [ex(nums[0], split=pinned)]
    examples[-1] = Example(id="dup", messages=examples[0].messages, meta={"split": pinned})
    parts = assign_splits(examples, seed, 0.3, 0.3)
    assert {e.id for e in parts[pinned]} >= {f"e{nums[0]}", "dup"}
    assert content_key(examples[0]) == content_key(examples[-1])


def test_prepare_writes_splits_without_claiming_the_run_folder(tmp_path, cli):
    records = [ex(i).to_json() for i in range(40)]
    write_jsonl(tmp_path / "c.jsonl", records)
    recipe = write_recipe(tmp_path, [{"plugin": "chat_jsonl", "path": "c.jsonl"}])
    raw = (tmp_path / "c.jsonl").read_bytes()
    code, out, err = cli("prepare", str(recipe))
    assert code == 0, err
    run = tmp_path / "runs" / "recipe"
    folder = run / "data" / "splits"
    got = {}
    for name in ("train", "val", "test"):
        rows = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
        got[name] = rows
        assert f"{name}: {len(rows)} examples" in out
    assert sorted(r["id"] for rows in got.values() for r in rows) == sorted(
        r["id"] for r in records
    )
    assert not (run / "run.json").exists()
    assert (tmp_path / "c.jsonl").read_bytes() == raw
    # deterministic: a second prepare writes the same files
    first = {n: (folder / f"{n}.jsonl").read_bytes() for n in got}
    assert cli("prepare", str(recipe))[0] == 0
    assert {n: (folder / f"{n}.jsonl").read_bytes() for n in got} == first


def test_an_empty_split_that_was_asked_for_is_reported(tmp_path, cli):
    """Hash splits can leave a small dataset's val split empty: prepare says so, with the fix."""
    examples = [ex(i) for i in range(6)]
    records = [e.to_json() for e in examples]
    write_jsonl(tmp_path / "c.jsonl", records)

    def val_size(seed: int) -> int:
        return len(assign_splits(examples, seed, 0.2, 0.0)["val"])

    empty = next(s for s in range(1000) if val_size(s) == 0)
    filled = next(s for s in range(1000) if val_size(s) > 0)
    source = [{"plugin": "chat_jsonl", "path": "c.jsonl"}]
    for seed, warned in ((empty, True), (filled, False)):
        data = {"val_fraction": 0.2, "test_fraction": 0.0, "split_seed": seed}
        recipe = write_recipe(tmp_path, source, data=data)
        code, out, err = cli("prepare", str(recipe))
        assert code == 0, err
        text = out + err
        assert ("data.val_fraction = 0.2 put none of the 6 examples in val" in text) is warned
        assert ("data.split_seed" in text) is warned
        assert "data.test_fraction" not in text, "a split nobody asked for is not a problem"


def test_prepare_never_replaces_a_runs_splits(tmp_path, cli):
    """`prepare` after editing the data, with the name of an existing run (the default: the
    recipe's stem): the run's splits stay what it was trained on; prepare says how to go on."""
    from lorakit.rundir import RunDir

    write_jsonl(tmp_path / "c.jsonl", [ex(i).to_json() for i in range(40)])
    recipe = write_recipe(tmp_path, [{"plugin": "chat_jsonl", "path": "c.jsonl"}])
    assert cli("prepare", str(recipe))[0] == 0
    run = RunDir(tmp_path / "runs" / "recipe")
    try:
        run.start("", {}, [], "h", recipe)  # a run claimed the folder and trained on them
    finally:
        RunDir.release_all()
    before = {p.name: p.read_bytes() for p in run.splits.iterdir()}
    write_jsonl(tmp_path / "c.jsonl", [ex(i).to_json() for i in range(40, 60)])  # data edited
    code, _, err = cli("prepare", str(recipe))
    assert code == 2 and "Traceback" not in err
    assert "holds a run" in err and "output.name=recipe-2" in err, err
    assert {p.name: p.read_bytes() for p in run.splits.iterdir()} == before
    code, _, err = cli("prepare", str(recipe), "output.name=recipe-2")
    assert code == 0, err


def test_runs_stay_inside_output_dir_and_home_is_expanded(tmp_path, cli, monkeypatch):
    """An output.name that is a symbolic link is refused (it would write elsewhere);
    output.dir=~/x means the home folder, not a folder named '~'."""
    write_jsonl(tmp_path / "c.jsonl", [ex(i).to_json() for i in range(20)])
    recipe = write_recipe(tmp_path, [{"plugin": "chat_jsonl", "path": "c.jsonl"}])
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "evil").symlink_to(outside)
    code, _, err = cli("prepare", str(recipe), "output.name=evil")
    assert code == 2 and "symbolic link" in err and "Traceback" not in err, err
    assert list(outside.iterdir()) == []
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("prepare", str(recipe), "output.dir=~/x")
    assert code == 0, err
    assert (home / "x" / "recipe" / "data" / "splits" / "train.jsonl").is_file()
    assert not (tmp_path / "~").exists()


def test_the_split_seed_doc_says_the_split_follows_the_content_not_the_id():
    import attrs
    from lorakit.sections import DataSection

    # the doc said "depends only on its id and this": renaming an example moves nothing
    doc = attrs.fields(DataSection).split_seed.metadata["doc"]
    assert "content" in doc and "only on its id" not in doc
    a, b = ex(1), Example(id="renamed", messages=ex(1).messages)
    assert content_key(a) == content_key(b)
