"""The metrics a recipe's ``[eval]`` section picks: validation (no torch).

They are built with the rest of the run's plugins, by :mod:`lorakit.components`.
"""

from __future__ import annotations

from typing import Any

from lorakit.catalog import Catalog
from lorakit.errors import closest
from lorakit.options import structure
from lorakit.sections import EvalSection


def check_eval(catalog: Catalog, section: EvalSection) -> list[str]:
    """Problems with ``[eval].metrics`` and ``[eval.metric_options]``, each with a fix."""
    problems: list[str] = []
    known = catalog.names("metric")
    for i, name in enumerate(section.metrics):
        if name not in known:
            close = closest(name, known)
            hint = f"did you mean {close!r}? " if close else ""
            problems.append(
                f'[eval].metrics[{i}]: unknown metric "{name}"; {hint}'
                f"installed metrics: {', '.join(known) or '(none)'}"
            )
    if len(set(section.metrics)) != len(section.metrics):
        problems.append("[eval].metrics: a metric is listed twice; list each once")
    for name, table in section.metric_options.items():
        path = f"[eval.metric_options.{name}]"
        if name not in section.metrics:
            problems.append(
                f"{path}: {name!r} is not in [eval].metrics; add it there or remove this table"
            )
            continue
        if name not in known:
            continue
        if not isinstance(table, dict):
            problems.append(f"{path}: expected a table of options")
            continue
        cls = catalog.get("metric", name).options_class
        _, errs = structure(cls, table, path) if cls is not None else (None, [])
        problems += errs
    return problems


def needs_generation(metrics: dict[str, Any]) -> bool:
    return any(getattr(m, "kind", "") == "generation" for m in metrics.values())
