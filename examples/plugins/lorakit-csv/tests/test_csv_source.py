"""lorakit-csv's own tests: real files read through lorakit's public API, as a recipe would."""

from __future__ import annotations

import pytest
from lorakit.api import DataError, Message, example_problem, read_source
from lorakit_csv import CsvSource


def read(tmp_path, content: str, name: str = "data.csv", on_error: str = "fail", **options):
    (tmp_path / name).write_text(content, encoding="utf-8")
    return read_source(CsvSource, {"path": name, **options}, recipe_dir=tmp_path, on_error=on_error)


def test_rows_become_conversations(tmp_path):
    examples, skipped = read(
        tmp_path,
        'prompt,response\n2+2?,4\n"a, b?","yes, ""quoted""\nand two lines"\n',
    )
    assert skipped == []
    assert [ex.messages for ex in examples] == [
        (Message("user", "2+2?"), Message("assistant", "4")),
        (Message("user", "a, b?"), Message("assistant", 'yes, "quoted"\nand two lines')),
    ]
    assert [ex.meta["source"].rsplit(":", 1)[1] for ex in examples] == ["2", "3"]
    assert all(example_problem(ex) is None for ex in examples)


def test_tsv_column_mapping_system_id_split_and_tags(tmp_path):
    content = "key\tq\ta\tpersona\tfold\tlabels\nr1\thi\thello\tbe brief\tval\tx; y\nr2\tbye\tciao\t\t\t\n"
    examples, _ = read(
        tmp_path,
        content,
        name="d.tsv",
        prompt="q",
        response="a",
        system="persona",
        id="key",
        split="fold",
        tags="labels",
    )
    first, second = examples
    assert first.id == "r1" and first.messages[0] == Message("system", "be brief")
    assert first.meta["split"] == "val" and first.meta["tags"] == ["x", "y"]
    assert second.id == "r2" and len(second.messages) == 2 and "split" not in second.meta


def test_ids_are_content_hashes_and_stable(tmp_path):
    (a,), _ = read(tmp_path, "prompt,response\nq,a\n")
    (b,), _ = read(tmp_path, "prompt,response\n\nq,a\n", name="other.csv")
    assert a.id == b.id and a.id.startswith("csv-")


def test_explicit_delimiter(tmp_path):
    (ex,), _ = read(tmp_path, "prompt;response\nq;a,b\n", delimiter=";")
    assert ex.messages[1].content == "a,b"


@pytest.mark.parametrize(
    ("content", "message", "line"),
    [
        ("prompt,response\nq,\n", "column 'response' is empty", 2),
        ("prompt,response\nq,a,extra\n", "row has 3 fields, the header has 2", 2),
        ("prompt,response,s\nq,a,train\nq2,a2,validation\n", "column 's' is 'validation'", 3),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, content, message, line):
    options = {"split": "s"} if ",s\n" in content else {}
    with pytest.raises(DataError) as err:
        read(tmp_path, content, **options)
    assert message in str(err.value) and f"data.csv:{line}" in str(err.value)
    examples, skipped = read(tmp_path, content, on_error="skip", **options)
    assert len(skipped) == 1 and f"data.csv:{line}" in skipped[0][0]
    assert len(examples) + len(skipped) == content.count("\n") - 1  # every row accounted for


def test_a_missing_column_suggests_the_closest(tmp_path):
    with pytest.raises(DataError) as err:
        read(tmp_path, "question,answer\nq,a\n", prompt="questions", response="answer")
    assert "no column 'questions'" in str(err.value) and "did you mean 'question'" in str(err.value)


def test_options_are_validated_like_a_recipe(tmp_path):
    from lorakit.api import LorakitError

    with pytest.raises(LorakitError) as err:
        read(tmp_path, "prompt,response\nq,a\n", delimiter=":", colum="x")
    assert "delimiter" in str(err.value) and "colum" in str(err.value)
