"""``rouge_l``: mean ROUGE-L F-measure from Google's ``rouge-score`` package.

rouge-score's own tokenizer keeps only ``[a-z0-9]``, so text in any other script has no tokens
and scores 0 even against itself. :func:`words` replaces it: on ASCII text it gives exactly the
tokens rouge-score gives; elsewhere a word is a run of letters, digits and combining marks in any
script, and each Chinese character or Japanese kana is a token of its own (those scripts are
written without spaces; character-level matching is the usual choice for them).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import attrs
from lorakit.api import RegisterMetric, hookimpl, option

from lorakit_plugins.metrics._base import GenerationMetric

# Hiragana, Katakana (+ phonetic extensions, half-width forms), CJK ideographs (+ extension A,
# compatibility ideographs, the supplementary planes' extensions B and on).
_CHARACTER_TOKEN = re.compile(
    "[\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
    "\U00020000-\U0003134f]"
)


def _in_word(char: str) -> bool:
    return char.isalnum() or unicodedata.category(char).startswith("M")


def words(text: str, stem: Any = None) -> list[str]:
    """Lower-cased tokens of ``text``; ``stem`` (a Porter stemmer) stems those over 3 chars,
    as rouge-score does. Punctuation, spaces and ``_`` separate words and are not tokens."""
    tokens: list[str] = []
    word: list[str] = []
    for char in text.lower():
        if _CHARACTER_TOKEN.match(char):
            tokens.extend(["".join(word), char] if word else [char])
            word = []
        elif _in_word(char):
            word.append(char)
        elif word:
            tokens.append("".join(word))
            word = []
    if word:
        tokens.append("".join(word))
    if stem is not None:
        tokens = [stem(t) if len(t) > 3 else t for t in tokens]
    return tokens


class _Tokenizer:
    """What ``rouge_scorer.RougeScorer(tokenizer=...)`` calls."""

    def __init__(self, use_stemmer: bool):
        self._stem = None
        if use_stemmer:
            from nltk.stem import porter

            self._stem = porter.PorterStemmer().stem

    def tokenize(self, text: str) -> list[str]:
        return words(text, self._stem)


@attrs.frozen
class RougeLOptions:
    use_stemmer: bool = option(False, doc="Porter-stem words before matching (English text)")


class RougeL(GenerationMetric):
    """Mean per-example ROUGE-L F1 (longest common subsequence of words)."""

    Options = RougeLOptions

    def score_split(
        self, predictions: Sequence[str], references: Sequence[str], stopped: Sequence[bool]
    ) -> float:
        from rouge_score import rouge_scorer

        tokenizer = _Tokenizer(self.options.use_stemmer)
        scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizer)
        pairs = zip(predictions, references, strict=True)
        total = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs)
        return total / len(references)


@hookimpl
def lorakit_register_metrics(register: RegisterMetric) -> None:
    register("rouge_l", RougeL)
