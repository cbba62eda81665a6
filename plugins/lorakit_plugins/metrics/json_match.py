"""``json_match`` and ``json_field_accuracy``: compare parsed JSON, not strings.

``json_match`` counts a prediction right when the first JSON object in it equals the reference
object (key order and spacing do not matter). ``json_field_accuracy`` gives partial credit: the
share of the reference's top-level fields whose value the prediction reproduces exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorakit.api import RegisterMetric, hookimpl

from lorakit_plugins.metrics._base import GenerationMetric
from lorakit_plugins.metrics.json_valid import extract_json


class JsonMatch(GenerationMetric):
    """Fraction of predictions whose JSON object equals the reference's."""

    def score_split(
        self, predictions: Sequence[str], references: Sequence[str], stopped: Sequence[bool]
    ) -> float:
        hits = 0
        for pred, ref in zip(predictions, references, strict=True):
            want = extract_json(ref)
            hits += want is not None and extract_json(pred) == want
        return hits / len(references)


class JsonFieldAccuracy(GenerationMetric):
    """Share of reference fields (over the whole split) reproduced with the same value."""

    def score_split(
        self, predictions: Sequence[str], references: Sequence[str], stopped: Sequence[bool]
    ) -> float:
        total = right = 0
        for pred, ref in zip(predictions, references, strict=True):
            want = extract_json(ref) or {}
            got = extract_json(pred) or {}
            total += len(want)
            right += sum(1 for k, v in want.items() if k in got and got[k] == v)
        return right / total if total else float("nan")


@hookimpl
def lorakit_register_metrics(register: RegisterMetric) -> None:
    register("json_match", JsonMatch)
    register("json_field_accuracy", JsonFieldAccuracy)
