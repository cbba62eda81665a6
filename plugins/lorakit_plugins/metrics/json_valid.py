"""``json_valid``: share of completions that contain a parseable JSON object.

The first ``{`` starts a candidate; braces are matched while skipping string literals (with
escapes), so ``{"a": "}"}`` is found whole. If that candidate does not parse, the next ``{`` is
tried.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from lorakit.api import RegisterMetric, hookimpl

from lorakit_plugins.metrics._base import GenerationMetric


def _object_end(text: str, start: int) -> int | None:
    """Index just past the ``}`` that closes the ``{`` at ``start``, or None if unbalanced."""
    depth = 0
    in_string = False
    escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def extract_json(text: str) -> dict[str, Any] | None:
    """The first JSON object embedded in ``text`` (string-aware brace matching), or None."""
    start = text.find("{")
    while start >= 0:
        end = _object_end(text, start)
        if end is not None:
            try:
                value = json.loads(text[start:end])
            except json.JSONDecodeError:
                pass
            else:
                if isinstance(value, dict):
                    return value
        start = text.find("{", start + 1)
    return None


class JsonValid(GenerationMetric):
    """Fraction of predictions holding a JSON object."""

    def score_split(
        self, predictions: Sequence[str], references: Sequence[str], stopped: Sequence[bool]
    ) -> float:
        return sum(extract_json(p) is not None for p in predictions) / len(predictions)


@hookimpl
def lorakit_register_metrics(register: RegisterMetric) -> None:
    register("json_valid", JsonValid)
