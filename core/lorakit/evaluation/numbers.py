"""How reports write a metric's value for people (report.md, the run's summary, compare)."""

from __future__ import annotations

import math


def fmt(value: float | None, kind: str) -> str:
    """A metric value for people: losses with 4 decimals, generation metrics as points."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}" if kind == "generation" else f"{value:.4f}"
