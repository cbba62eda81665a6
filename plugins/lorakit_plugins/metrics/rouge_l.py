"""``rouge_l``: mean ROUGE-L F-measure from Google's ``rouge-score`` package."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from lorakit.api import RegisterMetric, hookimpl, option

from lorakit_plugins.metrics._base import GenerationMetric


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

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=self.options.use_stemmer)
        pairs = zip(predictions, references, strict=True)
        total = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs)
        return total / len(references)


@hookimpl
def lorakit_register_metrics(register: RegisterMetric) -> None:
    register("rouge_l", RougeL)
