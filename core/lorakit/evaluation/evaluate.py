"""The evaluation phase: base model and/or adapter on the recipe's eval splits, then reports.

``lorakit run`` calls :func:`evaluate_run` after saving the adapter; ``lorakit eval`` calls it on
a finished run; ``lorakit baseline`` calls it with ``adapter=False``. The base model is loaded
once (quantized exactly as in training); the adapter is then loaded onto it from the saved
folder, so what is scored is what was shipped. A baseline already written to
``<run>/baseline/`` with the same model, data and eval settings is reused, not recomputed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit import __version__
from lorakit.components import Components
from lorakit.contracts import ModelRef
from lorakit.errors import RunError
from lorakit.recipe import Recipe
from lorakit.rundir import RunDir, read_json

BASELINE_DIR = "baseline"
REPORT = "eval_report.json"
PREDICTIONS = "predictions.jsonl"


def baseline_key(recipe: Recipe, data_fingerprint: str) -> str:
    """Everything the base model's scores depend on; equal keys mean a reusable baseline."""
    from lorakit.options import to_plain

    blob = {
        "model": recipe.model.to_plain(),
        "quant": recipe.quant.to_plain(),
        "format": recipe.format.to_plain(),
        "eval": to_plain(recipe.eval),
        "max_length": recipe.train.max_length,
        "data": data_fingerprint,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _cached_baseline(folder: Path, key: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    report, preds = folder / REPORT, folder / PREDICTIONS
    if not report.is_file() or not preds.is_file():
        return None
    data = read_json(report)
    if data.get("baseline_key") != key:
        return None
    rows = [json.loads(line) for line in preds.read_text(encoding="utf-8").splitlines() if line]
    return data, rows


def _splits_to_score(
    recipe: Recipe, components: Components, run: RunDir, say: Callable[[str], None]
) -> Any:
    """A run's own saved splits when it has them (what it was trained on), else the sources'.

    When the sources changed since the run saved its splits, say so: the run is still scored on
    its own splits, never silently on different data.
    """
    from lorakit.data.pipeline import load_splits, read_split_files
    from lorakit.errors import LorakitError

    def read() -> Any:
        return load_splits(components.sources, recipe.data, recipe.recipe_dir)

    saved = read_split_files(run.splits)
    if saved is None:
        return read()
    try:
        now = read().fingerprint
    except LorakitError as exc:
        say(f"the data sources cannot be read now ({exc}); scoring the run's saved splits")
        return saved
    if now != saved.fingerprint:
        say(
            f"the data sources changed since {run.path.name} saved its splits (fingerprint "
            f"{saved.fingerprint} -> {now}): scoring the run's own splits in {run.splits}"
        )
    return saved


def evaluate_run(
    recipe: Recipe,
    components: Components,
    run_dir: Path,
    *,
    adapter: bool = True,
    baseline: bool | None = None,
    say: Callable[[str], None] = print,
    ref: ModelRef | None = None,
) -> Path | None:
    """Score and write reports; return the report path (None when there is nothing to score).

    ``ref``: the base model when the caller resolved it already (the runner), else resolved here.
    """
    from lorakit.evaluation.config import needs_generation
    from lorakit.evaluation.plot import plot_losses
    from lorakit.evaluation.report import write_outputs
    from lorakit.evaluation.scoring import SplitResult, score_model
    from lorakit.evaluation.sets import prepare_set
    from lorakit.load_run import load_model, prepare_inference
    from lorakit.modeling import load_adapter

    started = time.time()
    ev = recipe.eval
    run = RunDir(run_dir)
    adapter_dir = run.adapter if adapter else None
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file():
        raise RunError(
            f"{run_dir} has no trained adapter", fix="train it first with `lorakit run RECIPE`"
        )
    with_base = (ev.baseline if baseline is None else baseline) or not adapter
    out_dir = run.path if adapter else run.path / BASELINE_DIR

    # Prepare each split once; the base and tuned model see the same rows and prompts.
    loaded = prepare_inference(recipe, components, adapter_dir, ref=ref)
    splits = _splits_to_score(recipe, components, run, say)
    metrics = components.metrics
    sets = [
        prepare_set(
            name,
            splits.get(name),
            loaded.formatter,
            loaded.tokenizer,
            max_length=recipe.train.max_length,
            overlength=recipe.data.overlength,
            max_examples=ev.max_examples,
            generation=needs_generation(metrics),
        )
        for name in ev.splits
    ]
    sets = [s for s in sets if s.n_examples]
    if not sets:
        say(f"nothing to evaluate: splits {', '.join(ev.splits)} are empty")
        return None
    key = baseline_key(recipe, splits.fingerprint)

    def score(model: Any) -> list[SplitResult]:
        return score_model(
            model,
            loaded.tokenizer,
            sets,
            metrics,
            stop_ids=loaded.stop_ids,
            max_new_tokens=ev.max_new_tokens,
            gen_batch_size=ev.batch_size,
            loss_batch_size=recipe.train.per_device_eval_batch_size,
        )

    sizes = ", ".join(f"{s.split} {s.n_examples}" for s in sets)
    base: list[SplitResult] | None = None
    cached = _cached_baseline(run.path / BASELINE_DIR, key) if adapter and with_base else None
    if cached is not None:
        say(f"reusing the baseline in {run.path / BASELINE_DIR} (same model, data and [eval])")
        base = cached_results(cached[0], cached[1], sets)
    model = load_model(loaded, None)
    if with_base and base is None:
        say(f"scoring the base model on {sizes} examples")
        base = score(model)
    tuned: list[SplitResult] | None = None
    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir, trainable=False)
        model.eval()
        say(f"scoring base + adapter on {sizes} examples")
        tuned = score(model)

    info = {
        "lorakit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": recipe.name,
        "model": loaded.ref.label or loaded.ref.path,
        "adapter": str(adapter_dir) if adapter_dir is not None else None,
        "config_hash": recipe.config_hash(),
        "data_fingerprint": splits.fingerprint,
        "baseline_key": key,
        "eval": recipe.resolved()["eval"],
    }
    report = write_outputs(out_dir, info, sets, metrics, base, tuned, time.time() - started)
    if adapter and run.metrics.is_file():
        plot_losses(run.metrics, out_dir / "loss.png")
    for line in summary_lines(metrics, base, tuned):
        say(line)
    say(f"report: {out_dir / 'report.md'}")
    return report


def cached_results(
    report: dict[str, Any], rows: list[dict[str, Any]], sets: list[Any]
) -> list[Any]:
    """Rebuild the base model's results from a reusable baseline folder."""
    from lorakit.decoding import Generation
    from lorakit.evaluation.scoring import SplitResult

    out = []
    for s in sets:
        entry = next(
            (r for r in report["results"] if r["split"] == s.split and r["adapter"] is None), None
        )
        if entry is None:
            raise RunError(f"baseline report lacks split {s.split}", fix="rerun `lorakit baseline`")
        by_id = {r["id"]: r for r in rows if r["split"] == s.split}
        gens = [
            Generation(by_id[i]["base"], by_id[i]["base_stopped"], 0) for i in s.ids if i in by_id
        ]
        out.append(SplitResult(s.split, entry["metrics"], entry["counts"], gens))
    return out


def summary_lines(
    metrics: dict[str, Any], base: list[Any] | None, tuned: list[Any] | None
) -> list[str]:
    from lorakit.evaluation.report import fmt

    lines = []
    for i, res in enumerate(tuned or base or []):
        parts = []
        for name, metric in metrics.items():
            kind = metric.kind
            b = base[i].metrics.get(name) if base else None
            t = tuned[i].metrics.get(name) if tuned else None
            if b is not None and t is not None:
                parts.append(f"{name} {fmt(b, kind)} -> {fmt(t, kind)}")
            else:
                parts.append(f"{name} {fmt(b if t is None else t, kind)}")
        lines.append(f"{res.split}: " + ", ".join(parts))
    return lines
