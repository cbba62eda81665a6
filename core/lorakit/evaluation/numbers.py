"""How reports write a metric's value for people (report.md, the run's summary, compare)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def fmt(value: float | None, kind: str) -> str:
    """A metric value for people: losses with 4 decimals, generation metrics as points."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}" if kind == "generation" else f"{value:.4f}"


def nan_for_null(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A metric table read back from a report: null (how lorakit writes NaN, which JSON lacks:
    ``rundir.null_for_nan``) is NaN again, so a value read back reads as the one that was written."""
    return {name: math.nan if value is None else value for name, value in metrics.items()}
