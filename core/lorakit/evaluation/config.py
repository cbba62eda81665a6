"""The metrics a recipe's ``[eval]`` section picks: validation (no torch).

They are built with the rest of the run's plugins, by :mod:`lorakit.components`.
"""

from __future__ import annotations

from typing import Any

from lorakit.catalog import Catalog, check_named_plugins
from lorakit.sections import EvalSection


def check_eval(catalog: Catalog, section: EvalSection) -> list[str]:
    """Problems with ``[eval].metrics`` and ``[eval.metric_options]``, each with a fix."""
    return check_named_plugins(
        catalog,
        "metric",
        section.metrics,
        section.metric_options,
        "[eval].metrics",
        "eval.metric_options",
    )


def needs_generation(metrics: dict[str, Any]) -> bool:
    return any(m.kind == "generation" for m in metrics.values())
