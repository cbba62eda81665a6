"""``json_match`` and ``json_field_accuracy``: compare parsed JSON, not strings.

``json_match`` counts a prediction right when its JSON equals the reference's (key order and
spacing do not matter): a text that is one JSON value as a whole (an object, or an array of
them) is that value, else the first JSON object in it. ``json_field_accuracy`` gives partial
credit: the share of the reference object's top-level fields whose value the prediction
reproduces exactly. Values compare as JSON does: ``true`` is not ``1`` and ``false`` is not
``0`` (Python's ``==`` says they are), while ``1`` and ``1.0`` are the same number.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from lorakit.api import RegisterMetric, hookimpl

from lorakit_plugins.metrics._base import GenerationMetric
from lorakit_plugins.metrics.json_valid import extract_json


def json_value(text: str) -> Any:
    """The JSON in ``text``: the whole text when it is one JSON value, else its first JSON
    object, else None."""
    try:
        return json.loads(text.strip())
    except ValueError:
        return extract_json(text)


def same_json(a: Any, b: Any) -> bool:
    """``a`` and ``b`` are the same JSON value: booleans only equal booleans, numbers compare by
    value, objects and arrays element by element."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
        return False
    return bool(a == b)


class JsonMatch(GenerationMetric):
    """Fraction of predictions whose JSON equals the reference's."""

    def score_split(
        self, predictions: Sequence[str], references: Sequence[str], stopped: Sequence[bool]
    ) -> float:
        hits = 0
        for pred, ref in zip(predictions, references, strict=True):
            want = json_value(ref)
            hits += want is not None and same_json(json_value(pred), want)
        return hits / len(references)


class JsonFieldAccuracy(GenerationMetric):
    """Share of reference fields (over the whole split) reproduced with the same value."""

    def score_split(
        self, predictions: Sequence[str], references: Sequence[str], stopped: Sequence[bool]
    ) -> float:
        total = right = 0
        for pred, ref in zip(predictions, references, strict=True):
            want, got = json_value(ref), json_value(pred)
            want = want if isinstance(want, dict) else {}
            got = got if isinstance(got, dict) else {}
            total += len(want)
            right += sum(1 for k, v in want.items() if k in got and same_json(got[k], v))
        return right / total if total else float("nan")


@hookimpl
def lorakit_register_metrics(register: RegisterMetric) -> None:
    register("json_match", JsonMatch)
    register("json_field_accuracy", JsonFieldAccuracy)
