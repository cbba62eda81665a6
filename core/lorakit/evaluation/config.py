"""What a run's metrics need: ``needs_generation`` (no torch).

``[eval]`` is validated by :mod:`lorakit.recipe`; the metrics are built with the rest of the
run's plugins, by :mod:`lorakit.components`.
"""

from __future__ import annotations

from typing import Any


def needs_generation(metrics: dict[str, Any]) -> bool:
    return any(m.kind == "generation" for m in metrics.values())
