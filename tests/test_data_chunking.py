"""Markdown chunking: chunks reassemble into the document exactly and each fits max_length."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lorakit.contracts import Example
from lorakit.data.chunking import chunk_text
from lorakit.data.pipeline import DataReport, tokenize_examples
from lorakit.errors import DataError
from lorakit_plugins.formatters.chatml import ChatmlFormatter, ChatmlOptions
from lorakit_plugins.formatters.raw_text import RawTextFormatter, RawTextOptions

SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
FORMATTERS = [RawTextFormatter(RawTextOptions()), ChatmlFormatter(ChatmlOptions())]

line = st.one_of(
    st.text("abcdefg hij.!?", min_size=0, max_size=60),
    st.from_regex(r"#{1,3} [a-z ]{1,20}", fullmatch=True),
)
document = st.lists(line, min_size=1, max_size=40).map("\n".join).filter(lambda s: s.strip())


@pytest.mark.parametrize("formatter", FORMATTERS, ids=["raw_text", "chatml"])
@SETTINGS
@given(text=document, max_length=st.integers(12, 80))
def test_chunks_reassemble_and_fit(formatter, text, max_length, data_tokenizer):
    doc = Example(id="doc.md", text=text, meta={"chunkable": True})
    report = DataReport()
    rows = tokenize_examples([doc], formatter, data_tokenizer, max_length, "error", report)
    assert all(len(r.input_ids) <= max_length for r in rows)
    # Rebuild the chunks the same way and check they concatenate to the text.
    from lorakit.data.pipeline import render_and_tokenize

    pieces, _ = render_and_tokenize([doc], formatter, data_tokenizer, max_length, DataReport())
    assert "".join(p.text for p in pieces) == text
    if len(pieces) > 1:
        assert report.chunked == {"doc.md": len(pieces)}
        assert [p.id for p in pieces] == [f"doc.md#{k}" for k in range(len(pieces))]


def test_cuts_prefer_headings_then_paragraphs():
    text = "# A\n\npara one is here.\n\npara two.\n# B\n\nmore text here."

    def fits(s: str) -> bool:
        return len(s) <= 40

    pieces = chunk_text(text, fits)
    assert "".join(pieces) == text
    assert pieces[1].startswith("# B")


def test_a_budget_too_small_for_the_format_is_an_error(data_tokenizer):
    doc = Example(id="d", text="word " * 50, meta={"chunkable": True})
    with pytest.raises(DataError, match="cannot chunk example d"):
        tokenize_examples([doc], FORMATTERS[0], data_tokenizer, 2, "drop", DataReport())


def test_without_chunkable_the_overlength_policy_applies(data_tokenizer):
    doc = Example(id="d", text="word " * 50)
    report = DataReport()
    assert tokenize_examples([doc], FORMATTERS[0], data_tokenizer, 16, "drop", report) == []
    assert report.dropped == {"longer than train.max_length=16": 1}


def test_chunking_tokenizes_about_the_document_a_few_times_not_once_per_chunk(data_tokenizer):
    """Linear time without a clock: count the characters ``fits`` is asked to tokenize.

    Bisecting over the whole rest of the document costs about (chunks x length) characters;
    the chunker must stay within a small multiple of the length, at any document size.
    """
    from lorakit.data.pipeline import _fits, _token_ends

    para = "# Title\n\nThe quick brown fox jumps over the lazy dog. Hello world, a test!\n\n"
    asked: dict[int, int] = {}
    for copies in (100, 400):
        text = para * copies
        doc = Example(id="d", text=text, meta={"chunkable": True})
        fits = _fits(FORMATTERS[0], data_tokenizer, 64, doc)
        seen = [0]

        def counting(piece: str, fits=fits, seen=seen) -> bool:
            seen[0] += len(piece)
            return fits(piece)

        pieces = chunk_text(text, counting, _token_ends(text, data_tokenizer))
        assert "".join(pieces) == text and len(pieces) >= copies // 2
        asked[copies] = seen[0]
        assert seen[0] < 20 * len(text), (copies, seen[0] / len(text))
    # Four times the text asks about four times the characters (not sixteen).
    assert asked[400] < 5 * asked[100]


def test_token_ends_only_guide_the_search(data_tokenizer):
    """With or without token ends (or with wrong ones) the cuts are the same."""
    text = "# A\n\npara one is here.\n\npara two.\n# B\n\nmore text here. " * 20

    def fits(s: str) -> bool:
        return len(s) <= 40

    plain = chunk_text(text, fits)
    assert chunk_text(text, fits, list(range(3, len(text), 7))) == plain
    assert chunk_text(text, fits, [len(text)]) == plain
    assert "".join(plain) == text and all(len(p) <= 40 for p in plain)
