"""``eval_loss`` and ``perplexity``: token-weighted, so independent of the eval batch size.

Both read the same sums the evaluator collects over a split (summed negative log-likelihood of
every supervised token, and their count); neither averages per-batch means.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import attrs
from lorakit import hookimpl


@attrs.frozen
class NoOptions:
    """This metric takes no options."""


class EvalLoss:
    """Mean negative log-likelihood per supervised token (nats)."""

    Options = NoOptions
    kind: ClassVar[str] = "loss"
    higher_is_better: ClassVar[bool] = False

    def __init__(self, options: Any):
        self.options = options

    def score(self, nll_sum: float, n_tokens: int) -> float:
        return nll_sum / n_tokens if n_tokens else float("nan")


class Perplexity:
    """exp(mean negative log-likelihood per supervised token)."""

    Options = NoOptions
    kind: ClassVar[str] = "loss"
    higher_is_better: ClassVar[bool] = False

    def __init__(self, options: Any):
        self.options = options

    def score(self, nll_sum: float, n_tokens: int) -> float:
        return math.exp(nll_sum / n_tokens) if n_tokens else float("nan")


@hookimpl
def lorakit_register_metrics(register):
    register("eval_loss", EvalLoss)
    register("perplexity", Perplexity)
