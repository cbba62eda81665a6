"""``exact_match``: share of completions equal to the reference (after optional normalization)."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from lorakit.api import RegisterMetric, hookimpl, option

from lorakit_plugins.metrics._base import GenerationMetric


@attrs.frozen
class ExactMatchOptions:
    strip: bool = option(True, doc="ignore leading and trailing whitespace")
    ignore_case: bool = option(False, doc="compare case-insensitively")
    collapse_whitespace: bool = option(False, doc="treat runs of whitespace as one space")


class ExactMatch(GenerationMetric):
    """Fraction of predictions that equal their reference."""

    Options = ExactMatchOptions

    def normalize(self, text: str) -> str:
        o = self.options
        if o.collapse_whitespace:
            text = " ".join(text.split())
        if o.strip:
            text = text.strip()
        if o.ignore_case:
            text = text.casefold()
        return text

    def score_split(
        self, predictions: Sequence[str], references: Sequence[str], stopped: Sequence[bool]
    ) -> float:
        hits = sum(
            self.normalize(p) == self.normalize(r)
            for p, r in zip(predictions, references, strict=True)
        )
        return hits / len(references)


@hookimpl
def lorakit_register_metrics(register: RegisterMetric) -> None:
    register("exact_match", ExactMatch)
