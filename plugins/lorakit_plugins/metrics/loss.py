"""``eval_loss`` and ``perplexity``: token-weighted, so independent of the eval batch size.

Both read the same sums the evaluator collects over a split (summed negative log-likelihood of
every supervised token, and their count); neither averages per-batch means.
"""

from __future__ import annotations

import math

from lorakit.api import RegisterMetric, hookimpl

from lorakit_plugins.metrics._base import LossMetric


class EvalLoss(LossMetric):
    """Mean negative log-likelihood per supervised token (nats)."""

    default = True  # scored when a recipe names no [eval].metrics

    def from_mean_nll(self, mean_nll: float) -> float:
        return mean_nll


class Perplexity(LossMetric):
    """exp(mean negative log-likelihood per supervised token)."""

    default = True  # scored when a recipe names no [eval].metrics

    def from_mean_nll(self, mean_nll: float) -> float:
        return math.exp(mean_nll)


@hookimpl
def lorakit_register_metrics(register: RegisterMetric) -> None:
    register("eval_loss", EvalLoss)
    register("perplexity", Perplexity)
