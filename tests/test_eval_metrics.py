"""Every metric plugin against values worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from lorakit.catalog import build_catalog, make_manager


@pytest.fixture(scope="module")
def catalog():
    return build_catalog(make_manager())


def metric(catalog, name, **options):
    entry = catalog.get("metric", name)
    return entry.factory(entry.options_class(**options))


def test_every_builtin_metric_is_registered(catalog):
    names = set(catalog.names("metric"))
    assert {
        "eval_loss",
        "perplexity",
        "exact_match",
        "json_valid",
        "json_match",
        "json_field_accuracy",
        "token_f1",
        "rouge_l",
        "bleu",
        "stops",
    } <= names
    for name in names:
        cls = catalog.get("metric", name).factory
        assert cls.kind in ("loss", "generation")
        assert isinstance(cls.higher_is_better, bool)


def test_every_metric_is_nan_on_an_empty_split(catalog):
    """Nothing scored is not a score of 0 (a report would read it as a total failure)."""
    for name in catalog.names("metric"):
        entry = catalog.get("metric", name)
        m = entry.factory(entry.options_class())
        got = m.score(0.0, 0) if m.kind == "loss" else m.score([], [], [])
        assert math.isnan(got), name


def test_eval_loss_and_perplexity_are_token_weighted(catalog):
    # two batches: 3 tokens with NLL 1.0 each, 1 token with NLL 5.0 -> 8 / 4 = 2.0
    assert metric(catalog, "eval_loss").score(8.0, 4) == pytest.approx(2.0)
    assert metric(catalog, "perplexity").score(8.0, 4) == pytest.approx(math.exp(2.0))
    assert math.isnan(metric(catalog, "eval_loss").score(0.0, 0))


def test_exact_match(catalog):
    m = metric(catalog, "exact_match")
    assert m.score(["a", " b ", "C"], ["a", "b", "c"], [True] * 3) == pytest.approx(2 / 3)
    m = metric(catalog, "exact_match", ignore_case=True)
    assert m.score(["a", " b ", "C"], ["a", "b", "c"], [True] * 3) == 1.0
    m = metric(catalog, "exact_match", strip=False)
    assert m.score([" b "], ["b"], [True]) == 0.0


def test_json_valid_is_string_aware(catalog):
    from lorakit_plugins.metrics.json_valid import extract_json

    assert extract_json('Sure! {"a": "}{", "b": {"c": 1}} done') == {"a": "}{", "b": {"c": 1}}
    assert extract_json('x {"q": "say \\"hi\\" }"} y') == {"q": 'say "hi" }'}
    assert extract_json('{bad} then {"ok": true}') == {"ok": True}
    assert extract_json("[1, 2]") is None
    assert extract_json('{"open": 1') is None
    m = metric(catalog, "json_valid")
    preds = ['{"a": 1}', "no json", 'text {"b": [1, 2]} text', "{'single': 1}"]
    assert m.score(preds, [""] * 4, [True] * 4) == 0.5


def test_json_match_and_field_accuracy(catalog):
    refs = ['{"item": "hat", "size": null}', '{"item": "coat", "size": "M"}']
    preds = ['{"size": null, "item": "hat"}', 'Here: {"item": "coat", "size": "L"}']
    assert metric(catalog, "json_match").score(preds, refs, [True, True]) == 0.5
    # fields: hat row 2/2, coat row 1/2 -> 3 of 4
    assert metric(catalog, "json_field_accuracy").score(preds, refs, [True, True]) == 0.75
    assert metric(catalog, "json_match").score(["nope"], ['{"a": 1}'], [True]) == 0.0


def test_json_metrics_compare_as_json_does(catalog):
    """``true`` is not ``1`` (Python's == says it is), a whole-text array is compared whole
    (not reduced to its first object), and 1 and 1.0 are one number."""
    match, fields = metric(catalog, "json_match"), metric(catalog, "json_field_accuracy")
    assert match.score(['{"in_stock": 1}'], ['{"in_stock": true}'], [True]) == 0.0
    assert match.score(['{"a": [false, 2]}'], ['{"a": [0, 2]}'], [True]) == 0.0
    assert match.score(['{"qty": 1.0}'], ['{"qty": 1}'], [True]) == 1.0
    assert match.score(['[{"a": 1}]'], ['[{"a": 1}, {"a": 2}]'], [True]) == 0.0
    assert match.score(['[{"a": 1}, {"a": 2}]'], ['[{"a": 1}, {"a": 2}]'], [True]) == 1.0
    assert match.score(['Sure: {"a": 1} done'], ['{"a": 1}'], [True]) == 1.0
    pred = '{"a": 1, "b": 0, "c": "x"}'
    assert fields.score([pred], ['{"a": true, "b": false, "c": "x"}'], [True]) == 1 / 3


def test_token_f1(catalog):
    m = metric(catalog, "token_f1")
    # pred tokens: the cat sat (3); ref: the cat sat down (4); common 3 -> P=1, R=.75, F1=6/7
    assert m.score(["The cat sat"], ["the cat sat down"], [True]) == pytest.approx(6 / 7)
    assert m.score(["", "x"], ["", "y"], [True, True]) == pytest.approx(0.5)


def test_token_f1_is_not_squad_normalised(catalog):
    """What docs/evaluation.md says of it: punctuation is a token and articles are kept."""
    m = metric(catalog, "token_f1")
    # the cat . vs cat: P = 1/3, R = 1 -> F1 = 0.5 (SQuAD's normalisation would give 1)
    assert m.score(["The cat."], ["cat"], [True]) == pytest.approx(0.5)
    assert m.score(["a dog"], ["the dog"], [True]) == pytest.approx(0.5)
    doc = (Path(__file__).parents[1] / "docs" / "evaluation.md").read_text(encoding="utf-8")
    (row,) = [line for line in doc.splitlines() if line.startswith("| `token_f1` |")]
    assert "SQuAD-style" not in row and "`The cat.` against `cat` is 0.5" in row


def test_rouge_l(catalog):
    m = metric(catalog, "rouge_l")
    # LCS of "a b c d" and "a c d e" is "a c d": P = R = 3/4 -> F = 0.75
    assert m.score(["a b c d"], ["a c d e"], [True]) == pytest.approx(0.75)
    assert m.score(["x y", "a b"], ["x y", "c d"], [True, True]) == pytest.approx(0.5)


def test_rouge_l_ascii_scores_are_rouge_scores_own(catalog):
    """Punctuation and ``_`` separate words and are not tokens, as in rouge-score's tokenizer."""
    m, stemmed = metric(catalog, "rouge_l"), metric(catalog, "rouge_l", use_stemmer=True)
    pred, ref = "The cats were running, fast!", "the cat runs fast"
    # LCS "the fast": P = 2/5, R = 2/4 -> F = 4/9; stemmed, "the cat run fast": P = 4/5, R = 1
    assert m.score([pred], [ref], [True]) == pytest.approx(4 / 9)
    assert stemmed.score([pred], [ref], [True]) == pytest.approx(8 / 9)
    assert m.score(["don't_stop me-now"], ["Don't stop me now."], [True]) == 1.0


@pytest.mark.parametrize(
    "text", ["東京は日本の首都です", "Привет мир", "नमस्ते दुनिया", "naïve café", "서울은 수도다"]
)
def test_rouge_l_scores_identical_text_1_in_any_script(catalog, text):
    """rouge-score's own tokenizer keeps only [a-z0-9]: these all scored 0 against themselves."""
    for m in (metric(catalog, "rouge_l"), metric(catalog, "rouge_l", use_stemmer=True)):
        assert m.score([text], [text], [True]) == 1.0


def test_rouge_l_matches_chinese_and_japanese_by_character(catalog):
    from lorakit_plugins.metrics.rouge_l import words

    assert words("東京は首都 Tokyo, café") == ["東", "京", "は", "首", "都", "tokyo", "café"]
    # 8 of the reference's 10 characters, in order: P = 1, R = 0.8 -> F = 8/9
    got = metric(catalog, "rouge_l").score(["東京は日本の首都"], ["東京は日本の首都です"], [True])
    assert got == pytest.approx(8 / 9)


def test_bleu(catalog):
    m = metric(catalog, "bleu")
    same = "the quick brown fox jumps over the lazy dog"
    assert m.score([same], [same], [True]) == 1.0
    assert m.score(["completely unrelated words here"], [same], [True]) == pytest.approx(0.0)
    # 4 of 5 unigrams, 3/4 bigrams, 2/3 trigrams, 1/2 4-grams, no brevity penalty (5 vs 5)
    got = m.score(["a b c d x"], ["a b c d e"], [True])
    assert got == pytest.approx((0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25, rel=1e-6)
    # corpus statistics, pooled over both: 13/14, 11/12, 9/10, 7/8 (unchanged by effective order)
    got = m.score([same, "a b c d x"], [same, "a b c d e"], [True] * 2)
    assert got == pytest.approx((13 / 14 * 11 / 12 * 9 / 10 * 7 / 8) ** 0.25, rel=1e-9)


def test_bleu_of_a_perfect_model_on_short_answers_is_1(catalog):
    """With no 4-gram in any prediction plain BLEU was 0 (log of 0/0), whatever the model said."""
    m = metric(catalog, "bleu")
    assert m.score(["the red car"], ["the red car"], [True]) == 1.0
    assert m.score(["red", "yes"], ["red", "yes"], [True, True]) == 1.0
    # unigrams 3/3, bigrams 1/1, no trigram in the predictions; brevity penalty exp(1 - 4/3)
    got = m.score(["red car", "yes"], ["the red car", "yes"], [True, True])
    assert got == pytest.approx(math.exp(1 - 4 / 3), rel=1e-9)
    assert m.score(["red", "blue"], ["red", "green"], [True, True]) == pytest.approx(0.5)


def test_stops(catalog):
    m = metric(catalog, "stops")
    assert m.score(["a", "b", "c", "d"], ["", "", "", ""], [True, False, True, True]) == 0.75
    assert math.isnan(m.score([], [], []))
