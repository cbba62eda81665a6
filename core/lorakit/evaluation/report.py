"""Write ``eval_report.json``, ``predictions.jsonl`` and ``report.md`` for one evaluation.

``eval_report.json`` holds one result per (model, split): ``adapter`` is null for the base model.
Generation metrics are fractions in [0, 1]; ``report.md`` shows them as points (x 100).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.evaluation.numbers import fmt
from lorakit.evaluation.scoring import SplitResult
from lorakit.evaluation.sets import EvalSet
from lorakit.rundir import write_json
from lorakit.safe_files import write_text

if TYPE_CHECKING:
    from lorakit.evaluation.canary import GeneralScores
    from lorakit.evaluation.harness import HarnessScores

SAMPLES_IN_REPORT = 5
# the preference metrics of a pair evaluation (not plugins): how each is shown
PREFERENCE_KINDS = {
    "pref_accuracy": "generation",
    "pref_margin": "loss",
    "reward_accuracy": "generation",
    "reward_margin": "loss",
    "desirable_logp": "loss",
    "undesirable_logp": "loss",
}


def write_outputs(
    out_dir: Path,
    info: dict[str, Any],
    sets: Sequence[EvalSet],
    metrics: dict[str, Any],
    base: Sequence[SplitResult] | None,
    tuned: Sequence[SplitResult] | None,
    seconds: float,
    *,
    general: GeneralScores | None = None,
    start: Sequence[SplitResult] | None = None,
    harness: HarnessScores | None = None,
) -> Path:
    """``general``: the forgetting canary's scores (results with split ``general``);
    ``harness``: lm-eval's (results with split ``lm_eval/<task>``);
    ``start``: a preference run's starting adapter (``train.from_adapter``), scored too; its
    results say ``"role": "start"``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for label, group in (("base", base), ("start", start), ("tuned", tuned)):
        for res in group or []:
            entry = {
                "model": info["model"],
                "adapter": info["adapter"] if label == "tuned" else None,
                "split": res.split,
                "metrics": res.metrics,
                "counts": res.counts,
            }
            if label == "start":
                entry.update(adapter=info.get("start_adapter"), role="start")
            if label == "base" and res.pair_margins:  # DPO's reference, for a reused baseline
                entry["pair_margins"] = list(res.pair_margins)
            results.append(entry)
    if general is not None:
        results += general.results(info["model"], info["adapter"])
    if harness is not None:
        results += harness.results(info["model"], info["adapter"])
    kinds = {name: m.kind for name, m in metrics.items()}
    higher = {name: bool(m.higher_is_better) for name, m in metrics.items()}
    seen = {name for r in results for name in r["metrics"]}
    for name, kind in PREFERENCE_KINDS.items():  # shares as points, margins as numbers
        if name in seen:
            kinds[name], higher[name] = kind, True
    report = {
        **info,
        "metric_kinds": kinds,
        "higher_is_better": higher,
        "seconds": round(seconds, 1),
        "results": results,
    }
    if general is not None:
        report["canary"] = general.section()
    if harness is not None:
        report["lm_eval"] = harness.section()
    path = out_dir / "eval_report.json"
    write_json(path, report)
    _write_predictions(out_dir / "predictions.jsonl", sets, base, tuned)
    markdown = render_markdown(report, sets, base, tuned, general, harness)
    write_text(out_dir / "report.md", markdown)
    return path


def _write_predictions(
    path: Path,
    sets: Sequence[EvalSet],
    base: Sequence[SplitResult] | None,
    tuned: Sequence[SplitResult] | None,
) -> None:
    lines: list[str] = []
    for i, s in enumerate(sets):
        b = base[i].generations if base else []
        t = tuned[i].generations if tuned else []
        for j, ex_id in enumerate(s.ids):
            row: dict[str, Any] = {
                "split": s.split,
                "id": ex_id,
                "prompt": s.prompts[j],
                "reference": s.references[j],
            }
            if j < len(b):
                row.update(base=b[j].text, base_stopped=b[j].stopped)
            if j < len(t):
                row.update(tuned=t[j].text, tuned_stopped=t[j].stopped)
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    write_text(path, "".join(lines))  # atomic, never through a link planted at the path


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|") or " "


def render_markdown(
    report: dict[str, Any],
    sets: Sequence[EvalSet],
    base: Sequence[SplitResult] | None,
    tuned: Sequence[SplitResult] | None,
    general: GeneralScores | None = None,
    harness: HarnessScores | None = None,
) -> str:
    kinds: dict[str, str] = report["metric_kinds"]
    higher: dict[str, bool] = report["higher_is_better"]
    lines = [f"# Evaluation: {report['run']}", ""]
    lines.append(f"- base model: `{report['model']}`")
    lines.append(
        f"- adapter: `{report['adapter']}`"
        if report["adapter"]
        else "- adapter: none (base model alone)"
    )
    lines.append(
        f"- config hash `{report['config_hash']}`, data fingerprint `{report['data_fingerprint']}`"
    )
    lines.append("- generation metrics in points (0-100); losses in nats per supervised token")
    lines.append("")
    both = base is not None and tuned is not None
    for i, s in enumerate(sets):
        counts = (tuned or base or [])[i].counts
        lines.append(
            f"## Split `{s.split}` ({counts['examples']} examples, "
            f"{counts['supervised_tokens']} supervised tokens)"
        )
        lines.append("")
        if both:
            assert base is not None and tuned is not None
            lines += ["| metric | base | tuned | change |", "|---|---:|---:|---:|"]
            for name, kind in kinds.items():
                b, t = base[i].metrics.get(name), tuned[i].metrics.get(name)
                change = ""
                if b is not None and t is not None and not (math.isnan(b) or math.isnan(t)):
                    d = (t - b) * (100 if kind == "generation" else 1)
                    better = (d > 0) == higher[name] and d != 0
                    change = f"{d:+.1f}" if kind == "generation" else f"{d:+.4f}"
                    change += " (better)" if better else (" (worse)" if d else "")
                lines.append(f"| {name} | {fmt(b, kind)} | {fmt(t, kind)} | {change} |")
        else:
            only = (tuned or base or [])[i]
            lines += ["| metric | value |", "|---|---:|"]
            lines += [f"| {n} | {fmt(only.metrics.get(n), k)} |" for n, k in kinds.items()]
        if counts.get("skipped") or counts.get("truncated"):
            lines.append("")
        if counts.get("truncated"):
            lines.append(
                f"- scored after truncation: {counts['truncated']} x loss rows cut to "
                "train.max_length (data.overlength = truncate)"
            )
        if counts.get("skipped"):
            lines += [f"- not scored: {n} x {why}" for why, n in counts["skipped"].items()]
        lines.append("")
        if s.ids:
            lines += _samples(s, base[i] if base else None, tuned[i] if tuned else None)
    if general is not None:
        lines += general.markdown()
    if harness is not None:
        lines += harness.markdown()
    if report["adapter"]:
        lines += ["## Loss curves", "", "![training and eval loss](loss.png)", ""]
    return "\n".join(lines)


def _samples(s: EvalSet, base: SplitResult | None, tuned: SplitResult | None) -> list[str]:
    n = min(SAMPLES_IN_REPORT, len(s.ids))
    head = ["input", "reference"]
    if base is not None:
        head.append("base")
    if tuned is not None:
        head.append("tuned")
    out = [f"### Samples (first {n} of {len(s.ids)}; all in predictions.jsonl)", ""]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j in range(n):
        cells = [_cell(s.inputs[j]), _cell(s.references[j])]
        for res in (base, tuned):
            if res is not None and j < len(res.generations):
                g = res.generations[j]
                cells.append(_cell(g.text) + ("" if g.stopped else " *(no stop)*"))
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    return out
