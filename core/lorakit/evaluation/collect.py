"""Find every ``eval_report.json`` under a folder and flatten it into comparable rows."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def find_reports(root: Path) -> list[Path]:
    """Reports under ``root``; a run's own report before its baseline/ report."""
    found = list(root.rglob("eval_report.json")) if root.is_dir() else []
    return sorted(
        found,
        key=lambda p: (
            str(p.parent.parent if p.parent.name == "baseline" else p.parent),
            p.parent.name == "baseline",
        ),
    )


def read_report(path: Path) -> dict[str, Any]:
    """An eval report, or a RunError naming the file when it is not one (no traceback later)."""
    from lorakit.errors import RunError

    fix = f"remove {path} or evaluate again (lorakit eval RUN_DIR) to rewrite it"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RunError(f"{path}: not a readable eval report ({exc})", fix=fix) from None
    results = report.get("results", []) if isinstance(report, dict) else None
    if not isinstance(results, list) or not all(
        isinstance(r, dict) and isinstance(r.get("metrics", {}), dict) for r in results
    ):
        raise RunError(
            f"{path}: not an eval report (expected an object whose results are objects"
            " with a metrics table)",
            fix=fix,
        )
    return report


def _key(report: dict[str, Any], res: dict[str, Any]) -> tuple[Any, ...]:
    return (
        report.get("run"),
        res.get("model"),
        res.get("adapter"),
        res.get("split"),
        report.get("baseline_key")
        if res.get("adapter") is None
        else (report.get("created"), report.get("config_hash")),
    )


def collect_rows(root: Path) -> list[dict[str, Any]]:
    """``{run, model, adapter, split, metrics}`` rows; a base result seen twice is listed once,
    and so is a copy of a report (an experiment tracker's artifact store under the same folder
    holds one): a tuned result is identified by its adapter and the time it was evaluated, and
    the copy nearest ``root`` is the one listed."""
    reports: list[tuple[Path, dict[str, Any]]] = []
    for path in find_reports(root):
        reports.append((path, read_report(path)))
    owner: dict[tuple[Any, ...], Path] = {}
    for path, report in sorted(reports, key=lambda pr: len(pr[0].parts)):
        for res in report.get("results", []):
            owner.setdefault(_key(report, res), path)
    rows: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for path, report in reports:
        for res in report.get("results", []):
            key = _key(report, res)
            if key in seen or owner[key] != path:
                continue
            seen.add(key)
            rows.append(
                {
                    "run": report.get("run"),
                    "model": res.get("model"),
                    "adapter": res.get("adapter"),
                    "split": res.get("split"),
                    "metrics": res.get("metrics", {}),
                    "kinds": report.get("metric_kinds", {}),
                    "report": str(path),
                }
            )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    names: list[str] = []
    kinds: dict[str, str] = {}
    for r in rows:
        for name in r["metrics"]:
            if name not in names:
                names.append(name)
        kinds.update(r.get("kinds", {}))
    head = ["run", "model", "adapter", "split", *names]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * len(names)]
    for r in rows:
        cells = [
            r["run"] or "?",
            r["model"] or "?",
            "(base)" if r["adapter"] is None else "tuned",
            r["split"] or "?",
        ]
        for name in names:
            v = r["metrics"].get(name)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("")
            elif kinds.get(name) == "generation":
                cells.append(f"{100 * v:.1f}")
            else:
                cells.append(f"{v:.4f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
