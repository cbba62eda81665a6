"""``stops``: share of completions that ended with the template's end-of-turn token.

A model that never emits end-of-turn runs to ``max_new_tokens`` every time (the classic
pad == eos masking bug); this metric makes that visible.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorakit.api import RegisterMetric, hookimpl

from lorakit_plugins.metrics._base import GenerationMetric


class Stops(GenerationMetric):
    """Fraction of generations that stopped within ``[eval].max_new_tokens``."""

    def score_split(
        self, predictions: Sequence[str], references: Sequence[str], stopped: Sequence[bool]
    ) -> float:
        return sum(map(bool, stopped)) / len(stopped)


@hookimpl
def lorakit_register_metrics(register: RegisterMetric) -> None:
    register("stops", Stops)
