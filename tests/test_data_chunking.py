"""Markdown chunking: chunks reassemble into the document exactly and each fits max_length."""

from __future__ import annotations

import attrs
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


# Markdown with the shapes the cut rules treat differently: headings of 1-7 '#'s (7 is not a
# heading), runs of blank lines (with spaces or tabs), sentence ends, long words with no space.
md_line = st.one_of(
    st.text("abcdefg hij.!?", min_size=0, max_size=80),
    st.from_regex(r"#{1,7}[ \t][a-z ]{0,20}", fullmatch=True),
    st.sampled_from(["", " ", "\t", "  \t", "x" * 90, "end. Next! More? ok"]),
    st.text("aé€ 😀.\n", min_size=1, max_size=30),
)
markdown = st.lists(md_line, min_size=1, max_size=80).map("\n".join).filter(lambda s: s.strip())


def _reference(doc: Example, formatter, tokenizer, max_length: int) -> list[str]:
    """Today's chunks: :func:`chunk_text` asking ``fits`` about each prefix it searches."""
    from lorakit.data.pipeline import _fits, _token_ends

    return chunk_text(
        doc.text, _fits(formatter, tokenizer, max_length, doc), _token_ends(doc.text, tokenizer)
    )


@pytest.mark.parametrize("formatter", FORMATTERS, ids=["raw_text", "chatml"])
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=markdown, max_length=st.integers(8, 120))
def test_planned_chunks_are_todays_chunks(formatter, text, max_length, data_tokenizer):
    """The chunks planned from one tokenization equal :func:`chunk_text`'s, and each row is its
    rendered chunk tokenized on its own."""
    from lorakit.data.chunk_rows import chunk_document
    from lorakit.data.tokenize import tokenize_batch

    doc = Example(id="doc.md", text=text, meta={"chunkable": True})
    try:
        expected = _reference(doc, formatter, data_tokenizer, max_length)
    except ValueError:
        with pytest.raises(ValueError, match="does not fit"):
            chunk_document(doc, formatter, data_tokenizer, max_length)
        return
    pieces, rows, shown = chunk_document(doc, formatter, data_tokenizer, max_length)
    assert pieces == expected
    again = tokenize_batch(shown, data_tokenizer)
    assert [list(r.input_ids) for r in rows] == [list(r.input_ids) for r in again]
    assert [list(r.labels) for r in rows] == [list(r.labels) for r in again]
    assert [s.text for s in shown] == [
        formatter.render(attrs.evolve(doc, text=p), data_tokenizer).text for p in pieces
    ]


@SETTINGS
@given(text=markdown, max_length=st.integers(12, 80), seed=st.integers(0, 2**16))
def test_wrong_token_spans_only_cost_time(text, max_length, seed, data_tokenizer, monkeypatch):
    """Spans that are wrong (random) make the checks fail and today's search take over: the
    chunks stay the same."""
    import random
    from array import array

    from lorakit.data import chunk_rows

    doc = Example(id="d", text=text, meta={"chunkable": True})
    try:
        expected = _reference(doc, FORMATTERS[0], data_tokenizer, max_length)
    except ValueError:
        return
    rng = random.Random(seed)
    ends = sorted({rng.randrange(1, len(text) + 1) for _ in range(len(text) // 3 + 1)})
    starts = [0, *ends[:-1]]
    monkeypatch.setattr(
        chunk_rows, "token_spans", lambda t, tok: (array("l", starts), array("l", ends))
    )
    pieces, _, _ = chunk_rows.chunk_document(doc, FORMATTERS[0], data_tokenizer, max_length)
    assert pieces == expected


def test_a_long_document_is_tokenized_a_few_times_not_nine(data_tokenizer, monkeypatch):
    """Without a clock: count the characters handed to the tokenizer while a long document is
    chunked through ``tokenize_examples``: once for the token spans, once for the chunks (their
    rows), and the checks that prove the chunks are today's (here every chunk ends at a
    heading, the costliest case): 4.5x the text; the code before asked 8.8x."""
    from lorakit.data import chunk_rows, rows, tokenize

    para = "# Title\n\nThe quick brown fox jumps over the lazy dog. Hello world, a test!\n\n"
    text = para * 300
    seen = [0]
    real = tokenize.encode_with_offsets, tokenize.token_ids

    def offsets(texts, tok):
        seen[0] += sum(map(len, texts))
        return real[0](texts, tok)

    def ids(texts, tok):  # count_tokens and rows without offsets
        seen[0] += sum(map(len, texts))
        return real[1](texts, tok)

    for module in (tokenize, chunk_rows, rows):
        if hasattr(module, "encode_with_offsets"):
            monkeypatch.setattr(module, "encode_with_offsets", offsets)
        if hasattr(module, "token_ids"):
            monkeypatch.setattr(module, "token_ids", ids)
    doc = Example(id="d", text=text, meta={"chunkable": True})
    report = DataReport()
    kept = tokenize_examples([doc], FORMATTERS[0], data_tokenizer, 64, "error", report)
    assert report.chunked["d"] == len(kept) > 100
    assert seen[0] < 5 * len(text), seen[0] / len(text)


segment = st.builds(
    lambda text, sup: (text, sup),
    st.text("ab cd\n#.é漢", min_size=0, max_size=30),
    st.booleans(),
)


@SETTINGS
@given(rendered=st.lists(st.lists(segment, max_size=4), min_size=1, max_size=6))
def test_rows_tokenized_without_offsets_are_the_rows_with_them(rendered, data_tokenizer):
    """A text supervised throughout is tokenized without offsets (its labels are its ids):
    every row equals the one the offsets give, whatever the mix of segments."""
    from lorakit.contracts import Rendered, Segment
    from lorakit.data.tokenize import _char_mask, encode_with_offsets, labels_for, tokenize_batch

    examples = [Rendered(tuple(Segment(t, sup) for t, sup in segs)) for segs in rendered]
    ids, offsets = encode_with_offsets([r.text for r in examples], data_tokenizer)
    expected = [
        labels_for(i, o, _char_mask(r)) for i, o, r in zip(ids, offsets, examples, strict=True)
    ]
    rows = tokenize_batch(examples, data_tokenizer)
    assert [list(r.input_ids) for r in rows] == ids
    assert [list(r.labels) for r in rows] == expected


@SETTINGS
@given(text=st.text("ab cd\n\n# .!é漢\t", min_size=1, max_size=3000))
def test_byte_level_spans_are_the_tokenizers_offsets(text, data_tokenizer):
    """The planner's spans from token lengths (ASCII pieces, byte-level tokenizer) are the
    spans the tokenizer's offsets give."""
    from lorakit.data import chunk_rows
    from lorakit.data.tokenize import encode_with_offsets

    assert chunk_rows.byte_level_lengths(data_tokenizer) is not None  # the fast path is taken
    starts, ends = chunk_rows.token_spans(text, data_tokenizer)
    expected_starts, expected_ends = [], []
    for a, b in chunk_rows._pieces(text):
        _, (spans,) = encode_with_offsets([text[a:b]], data_tokenizer)
        expected_starts += [a + s for s, _ in spans]
        expected_ends += [a + e for _, e in spans]
    assert list(starts) == expected_starts
    assert list(ends) == expected_ends
