"""``token_f1``: bag-of-tokens F1 between prediction and reference, averaged over examples.

Tokens are lower-cased runs of ``\\w`` (letters, digits, ``_``, any script) and single punctuation
marks or symbols. Unlike SQuAD's F1 nothing is dropped: punctuation counts and articles are kept
(``f1("The cat.", "cat")`` is 0.5). A pair that is empty on both sides scores 1, empty on one
side scores 0.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from lorakit.api import RegisterMetric, hookimpl

from lorakit_plugins.metrics._base import GenerationMetric

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def f1(prediction: str, reference: str) -> float:
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class TokenF1(GenerationMetric):
    """Mean per-example token F1."""

    def score_split(
        self, predictions: Sequence[str], references: Sequence[str], stopped: Sequence[bool]
    ) -> float:
        pairs = zip(predictions, references, strict=True)
        return sum(f1(p, r) for p, r in pairs) / len(references)


@hookimpl
def lorakit_register_metrics(register: RegisterMetric) -> None:
    register("token_f1", TokenF1)
