"""Find every ``eval_report.json`` under a folder and flatten it into comparable rows."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

TEXT_FIELDS = ("run", "created", "config_hash", "baseline_key")  # of a report
RESULT_TEXT_FIELDS = ("model", "adapter", "split", "role")  # of each of its results


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
    # the fields rows are named and told apart by: text or null (a number there was a
    # TypeError in the table, a list one in telling reports apart)
    fields = [(key, report.get(key)) for key in TEXT_FIELDS]
    for i, res in enumerate(results):
        fields += [(f"results[{i}].{key}", res.get(key)) for key in RESULT_TEXT_FIELDS]
    for where, value in fields:
        if not (value is None or isinstance(value, str)):
            raise RunError(
                f"{path}: {where} is {type(value).__name__} {value!r:.40}, not a string or null",
                fix=fix,
            )
    for res in results:
        for name, value in res.get("metrics", {}).items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number or value is None):
                raise RunError(
                    f"{path}: metric {name!r} of split {res.get('split')!r} is "
                    f"{type(value).__name__} {value!r:.40}, not a number",
                    fix=fix,
                )
    if not isinstance(report.get("metric_kinds", {}), dict):
        raise RunError(f"{path}: metric_kinds is not an object", fix=fix)
    return report


def _key(report: dict[str, Any], res: dict[str, Any]) -> tuple[Any, ...]:
    return (
        report.get("run"),
        res.get("model"),
        res.get("adapter"),
        res.get("role"),
        res.get("split"),
        report.get("baseline_key")
        if res.get("adapter") is None
        else (report.get("created"), report.get("config_hash")),
    )


def _run_folder(report: Path) -> Path:
    return report.parent.parent if report.parent.name == "baseline" else report.parent


def _labels(root: Path, folders: list[Path]) -> dict[Path, str]:
    """Each run folder's name in the table: its own name, or its path under ``root`` when two
    folders share a name (the run name stored inside a report is the one it was trained under,
    so a copied run would otherwise show twice under one name)."""
    names: dict[str, set[Path]] = {}
    for folder in folders:
        names.setdefault(folder.name, set()).add(folder)
    out = {}
    for folder in folders:
        relative = folder.relative_to(root).as_posix()
        if relative == ".":
            out[folder] = root.resolve().name
        else:
            out[folder] = folder.name if len(names[folder.name]) == 1 else relative
    return out


def collect_rows(root: Path) -> list[dict[str, Any]]:
    """``{run, run_name, examples, model, adapter, split, metrics}`` rows. ``run`` is the folder
    the report came from (a copied run is told apart from its original), ``run_name`` the name
    stored in the report, ``examples`` how many examples the scores are over. A base result
    seen twice is listed once, and so is a copy of a report (an experiment tracker's artifact
    store under the same folder holds one): a tuned result is identified by its adapter and the
    time it was evaluated, and the copy nearest ``root`` is the one listed."""
    reports: list[tuple[Path, dict[str, Any]]] = []
    for path in find_reports(root):
        reports.append((path, read_report(path)))
    owner: dict[tuple[Any, ...], Path] = {}
    for path, report in sorted(reports, key=lambda pr: len(pr[0].parts)):
        for res in report.get("results", []):
            owner.setdefault(_key(report, res), path)
    labels = _labels(root, [_run_folder(path) for path, _ in reports])
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
                    "run": labels[_run_folder(path)],
                    "run_name": report.get("run"),
                    "examples": _examples(res),
                    "model": res.get("model"),
                    "adapter": res.get("adapter"),
                    "role": res.get("role"),  # "start": a preference run's starting adapter
                    "split": res.get("split"),
                    "metrics": res.get("metrics", {}),
                    "kinds": {
                        **report.get("metric_kinds", {}),
                        **_section_kinds(report, "canary"),
                        **_section_kinds(report, "lm_eval"),
                    },
                    "report": str(path),
                }
            )
    return rows


def _section_kinds(report: dict[str, Any], key: str) -> dict[str, str]:
    """How the metrics of the forgetting canary (``canary``) or lm-eval (``lm_eval``) read."""
    section = report.get(key)
    kinds = section.get("metric_kinds") if isinstance(section, dict) else None
    return kinds if isinstance(kinds, dict) else {}


def _examples(result: dict[str, Any]) -> int | None:
    counts = result.get("counts")
    n = counts.get("examples") if isinstance(counts, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def markdown_table(rows: list[dict[str, Any]]) -> str:
    names: list[str] = []
    kinds: dict[str, str] = {}
    for r in rows:
        for name in r["metrics"]:
            if name not in names:
                names.append(name)
        kinds.update(r.get("kinds", {}))
    head = ["run", "model", "adapter", "split", "examples", *names]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (1 + len(names))]
    for r in rows:
        stored = r.get("run_name")
        cells = [
            r["run"]
            if stored in (None, r["run"].rpartition("/")[2])
            else f"{r['run']} (run {stored})",
            r["model"] or "?",
            "(base)" if r["adapter"] is None else ("start" if r.get("role") else "tuned"),
            r["split"] or "?",
            "?" if r.get("examples") is None else str(r["examples"]),
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
