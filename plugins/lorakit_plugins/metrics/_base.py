"""Shared skeletons of the built-in metrics (see :class:`lorakit.contracts.Metric`).

A subclass names its ``Options`` (an attrs class; :class:`NoOptions` by default) and implements
one method over a non-empty split; the base returns NaN for an empty one, so no metric divides
by zero or reports 0 for "nothing scored".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import attrs


@attrs.frozen
class NoOptions:
    """This metric takes no options."""


class GenerationMetric:
    """``kind = "generation"``: scores completions against references; higher is better."""

    Options: ClassVar[type] = NoOptions
    kind: ClassVar[str] = "generation"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, options: Any):
        self.options = options

    def score(
        self, predictions: Sequence[str], references: Sequence[str], stopped: Sequence[bool]
    ) -> float:
        if not references:
            return math.nan
        return self.score_split(predictions, references, stopped)

    def score_split(
        self, predictions: Sequence[str], references: Sequence[str], stopped: Sequence[bool]
    ) -> float:
        raise NotImplementedError


class LossMetric:
    """``kind = "loss"``: a function of the mean NLL per supervised token; lower is better."""

    Options: ClassVar[type] = NoOptions
    kind: ClassVar[str] = "loss"
    higher_is_better: ClassVar[bool] = False

    def __init__(self, options: Any):
        self.options = options

    def score(self, nll_sum: float, n_tokens: int) -> float:
        return self.from_mean_nll(nll_sum / n_tokens) if n_tokens else math.nan

    def from_mean_nll(self, mean_nll: float) -> float:
        raise NotImplementedError
