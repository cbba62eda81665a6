"""``rouge_l``: mean ROUGE-L F-measure from Google's ``rouge-score`` package."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import attrs
from lorakit import hookimpl
from lorakit.options import option


@attrs.frozen
class RougeLOptions:
    use_stemmer: bool = option(False, doc="Porter-stem words before matching (English text)")


class RougeL:
    """Mean per-example ROUGE-L F1 (longest common subsequence of words)."""

    Options = RougeLOptions
    kind: ClassVar[str] = "generation"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, options: RougeLOptions):
        self.options = options

    def score(
        self, predictions: Sequence[str], references: Sequence[str], stopped: Sequence[bool]
    ) -> float:
        from rouge_score import rouge_scorer

        if not references:
            return float("nan")
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=self.options.use_stemmer)
        pairs = zip(predictions, references, strict=True)
        total = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs)
        return total / len(references)


@hookimpl
def lorakit_register_metrics(register):
    register("rouge_l", RougeL)
