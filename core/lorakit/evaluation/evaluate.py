"""The evaluation phase: the base model and/or the adapter on the recipe's eval splits, then
reports.

:func:`evaluate` scores a model that is already in memory on an :class:`EvalPlan` (the eval
sets, prepared once by :func:`plan_eval`). ``lorakit run`` hands it the model it has just
trained, with the trainer released, so a run never holds two base models; ``lorakit eval``
and ``lorakit baseline`` go through :func:`evaluate_run`, which loads the base model (quantized
and in the dtype it was trained in) and the saved adapter first. Either way the base model is
the adapter's own base with the adapter switched off, and the adapter is scored exactly as
saved (the run's test checks that both paths write the same report). A baseline already
written to ``<run>/baseline/`` with the same model, data and eval settings is reused, not
recomputed.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from lorakit import __version__
from lorakit.components import Components
from lorakit.contracts import ModelRef
from lorakit.data.pipeline import Splits
from lorakit.errors import RunError
from lorakit.evaluation.canary import (
    Canary,
    GeneralScores,
    cached_canary,
    prepare_canary,
    score_canary,
)
from lorakit.evaluation.harness import HarnessPlan, HarnessScores, plan_harness, score_harness
from lorakit.evaluation.numbers import nan_for_null
from lorakit.evaluation.sets import EvalSet
from lorakit.qpissa import adapter_off
from lorakit.recipe import Recipe
from lorakit.rundir import RunDir, no_adapter_fix, read_json

BASELINE_DIR = "baseline"
REPORT = "eval_report.json"
PREDICTIONS = "predictions.jsonl"


def baseline_key(recipe: Recipe, data_fingerprint: str, sets_digest: str = "") -> str:
    """Everything the base model's scores depend on; equal keys mean a reusable baseline.

    ``sets_digest`` (:func:`sets_digest`) is what is scored, exactly: the rows kept for the
    loss and how they were cut, the rendered prompts and references. It holds what the recipe's
    keys cannot show (the tokenizer and chat template in the model folder, what the formatter
    renders); the recipe's keys say how the base is scored (metrics and their options,
    generation settings)."""
    from lorakit.options import to_plain
    from lorakit.sections import LM_EVAL_KEYS

    ev = {k: v for k, v in to_plain(recipe.eval).items() if k not in LM_EVAL_KEYS}
    blob = {  # lm-eval's tasks are not: their base scores are reused by their own digest
        "model": recipe.model.to_plain(),
        "quant": recipe.quant.to_plain(),
        "format": recipe.format.to_plain(),
        "eval": ev,
        "metrics": [m.to_plain() for m in recipe.metrics],  # the resolved plugins and options
        "max_length": recipe.train.max_length,
        "overlength": eval_overlength(recipe.data.overlength),
        "objective": recipe.train.objective,
        "data": data_fingerprint,
        "sets": sets_digest,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def eval_overlength(policy: str) -> str:
    """The over-long policy an eval split is prepared with: ``error`` must not stop a run, so
    an eval split drops (and counts) what training would have refused."""
    return "drop" if policy == "error" else policy


def sets_digest(sets: list[EvalSet]) -> str:
    """A digest of exactly what :func:`evaluate` scores: each set's loss rows (ids and labels),
    pairs, answers, prompts and references."""
    from array import array

    h = hashlib.sha256()

    def tokens(values: Any) -> None:
        data = array("i", values).tobytes()
        h.update(len(data).to_bytes(8, "little") + data)

    def text(value: str) -> None:
        data = value.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little") + data)

    for s in sets:
        text(s.split)
        for row in s.rows:
            tokens(row.input_ids)
            tokens(row.labels)
        for pair in s.pairs:
            for side in (pair.chosen, pair.rejected):
                tokens(side.input_ids)
                tokens(side.labels)
        for answer in s.answers:
            tokens(answer.input_ids)
            tokens(answer.labels)
            text(str(answer.desirable))
        for value in (*s.ids, *s.prompts, *s.references):
            text(value)
    return h.hexdigest()[:16]


def _cached_baseline(
    folder: Path, key: str, sets: list[EvalSet], say: Callable[[str], None]
) -> tuple[dict[str, Any], list[Any]] | None:
    """The report of a baseline in ``folder`` scored with ``key`` and the base model's results
    rebuilt from it (:func:`cached_results`), or None.

    The baseline is a cache: one that cannot be read (damaged, cut short, edited) is not
    reused, and the base model is scored again (said), never a traceback."""
    report, preds = folder / REPORT, folder / PREDICTIONS
    if not report.is_file() or not preds.is_file():
        return None
    try:
        data = read_json(report)
    except RunError as exc:
        say(f"not reusing the baseline: {exc.message}; scoring the base model again")
        return None
    if data.get("baseline_key") != key:
        return None
    try:
        # split on "\n" alone: json.dumps(ensure_ascii=False) leaves U+2028, U+2029 and U+0085
        # raw in strings, and str.splitlines() would cut a line there
        text = preds.read_text(encoding="utf-8")
        rows = [json.loads(line) for line in text.split("\n") if line.strip()]
        if not all(isinstance(r, dict) for r in rows):
            raise ValueError("a line is not a JSON object")
        base = cached_results(data, rows, sets)  # every split and generation it must give back
    except (UnicodeDecodeError, ValueError, RunError, KeyError, TypeError) as exc:
        why = exc.message if isinstance(exc, RunError) else f"{type(exc).__name__}: {exc}"
        say(f"not reusing the baseline in {folder}: {why}; scoring the base model again")
        return None
    return data, base


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


@attrs.frozen
class EvalPlan:
    """What an evaluation scores, prepared once: the eval sets (the same rows and prompts for
    the base and the tuned model), the metrics, and what the reports record."""

    recipe: Recipe
    metrics: dict[str, Any]
    tokenizer: Any
    stop_ids: list[int]
    sets: list[EvalSet]
    data_fingerprint: str
    model_label: str
    canary: Canary | None = None  # general text and instructions ([eval].canary)
    harness: HarnessPlan | None = None  # lm-evaluation-harness tasks ([eval].lm_eval_tasks)
    sets_digest: str = ""  # sets_digest(sets), computed once

    @property
    def baseline_key(self) -> str:
        return baseline_key(self.recipe, self.data_fingerprint, self.sets_digest)


def plan_eval(
    recipe: Recipe,
    metrics: dict[str, Any],
    splits: Splits,
    formatter: Any,
    tokenizer: Any,
    stop_ids: list[int],
    model_label: str,
    say: Callable[[str], None] = print,
) -> EvalPlan | None:
    """Format and tokenize the recipe's eval splits; None (said) when they are all empty."""
    from lorakit.evaluation.config import needs_generation
    from lorakit.evaluation.sets import prepare_set

    ev = recipe.eval
    sets = [
        prepare_set(
            name,
            splits.get(name),
            formatter,
            tokenizer,
            max_length=recipe.train.max_length,
            overlength=eval_overlength(recipe.data.overlength),
            max_examples=ev.max_examples,
            generation=needs_generation(metrics),
            pairs=recipe.train.objective != "sft",
            answers=recipe.train.objective == "kto",
        )
        for name in ev.splits
    ]
    sets = [s for s in sets if s.n_examples]
    if not sets:
        say(f"nothing to evaluate: splits {', '.join(ev.splits)} are empty")
        return None
    return EvalPlan(
        recipe=recipe,
        metrics=metrics,
        tokenizer=tokenizer,
        stop_ids=list(stop_ids),
        sets=sets,
        data_fingerprint=splits.fingerprint,
        model_label=model_label,
        canary=prepare_canary(formatter, tokenizer, min(recipe.train.max_length, 256))
        if ev.canary
        else None,
        harness=plan_harness(recipe),
        sets_digest=sets_digest(sets),
    )


def evaluate(
    model: Any,
    plan: EvalPlan,
    run_dir: Path,
    *,
    adapter_dir: Path | None,
    with_base: bool,
    say: Callable[[str], None] = print,
) -> Path:
    """Score ``model`` on ``plan``'s sets and write the reports; return the report's path.

    ``model`` is the one in memory, however it got there: the runner passes the model it just
    trained, ``lorakit eval`` one loaded from the run folder. With ``adapter_dir`` (the adapter
    ``model`` carries, as saved) it is a PEFT model scored as base + adapter, and its base is
    scored with the adapter switched off (``with_base``), so one model in memory serves both;
    without, ``model`` is the base model alone and the reports go to ``<run>/baseline/``.
    A baseline already written there with the same model, data and [eval] is reused.
    """
    started = time.time()
    run = RunDir(run_dir)
    tuned_too = adapter_dir is not None
    model.eval()
    score = _scorer(model, plan)
    sizes = ", ".join(f"{s.split} {s.n_examples}" for s in plan.sets)
    cached = (
        _cached_baseline(run.path / BASELINE_DIR, plan.baseline_key, plan.sets, say)
        if tuned_too and with_base
        else None
    )
    base = _score_base(model, plan, run, cached, score, tuned_too, with_base, sizes, say)
    tuned: list[Any] | None = None
    start_run: tuple[Any, str] | None = None
    if tuned_too:
        say(f"scoring base + adapter on {sizes} examples")
        tuned = score()
        start_run = _score_start_adapter(model, plan, score, say)
        add_reward_metrics(plan.recipe, tuned, (start_run[0] if start_run else None) or base)
    general = _score_canary(model, plan, tuned_too, with_base, cached, say)
    harness = (
        score_harness(
            model,
            plan.tokenizer,
            plan.harness,
            tuned_too=tuned_too,
            with_base=with_base,
            cached_report=cached[0] if cached is not None else None,
            say=say,
        )
        if plan.harness is not None
        else None
    )
    out_dir = run.path if tuned_too else run.path / BASELINE_DIR
    report = _write_reports(
        out_dir, run, plan, adapter_dir, base, tuned, start_run, general, started, harness
    )
    start = start_run[0] if start_run else None
    _say_results(plan, base, start, tuned, general, out_dir, say, harness)
    return report


def _scorer(model: Any, plan: EvalPlan) -> Callable[[], list[Any]]:
    """Score ``model`` as it stands (adapter on, off or swapped) on every set of ``plan``."""
    from lorakit.evaluation.scoring import score_model

    recipe, ev = plan.recipe, plan.recipe.eval

    def score() -> list[Any]:
        return score_model(
            model,
            plan.tokenizer,
            plan.sets,
            plan.metrics,
            stop_ids=plan.stop_ids,
            max_new_tokens=ev.max_new_tokens,
            gen_batch_size=ev.batch_size,
            loss_batch_size=recipe.train.per_device_eval_batch_size,
            normalized_pairs=recipe.train.objective in ("simpo", "orpo"),
        )

    return score


def _score_base(
    model: Any,
    plan: EvalPlan,
    run: RunDir,
    cached: tuple[dict[str, Any], list[Any]] | None,
    score: Callable[[], list[Any]],
    tuned_too: bool,
    with_base: bool,
    sizes: str,
    say: Callable[[str], None],
) -> list[Any] | None:
    """The base model's results: from a matching baseline, else scored (the adapter switched
    off when ``model`` carries one); None without ``with_base``."""
    base = None
    if cached is not None:
        say(f"reusing the baseline in {run.path / BASELINE_DIR} (same model, data and [eval])")
        base = cached[1]
    if with_base and base is None:
        say(f"scoring the base model on {sizes} examples")
        if tuned_too:
            with adapter_off(model):  # the frozen base, exactly (a QPiSSA base too: qpissa.py)
                base = score()
        else:
            base = score()
    return base


def _write_reports(
    out_dir: Path,
    run: RunDir,
    plan: EvalPlan,
    adapter_dir: Path | None,
    base: list[Any] | None,
    tuned: list[Any] | None,
    start_run: tuple[Any, str] | None,
    general: GeneralScores | None,
    started: float,
    harness: HarnessScores | None = None,
) -> Path:
    """The report, predictions and (for a trained adapter) loss plot in ``out_dir``."""
    from lorakit.evaluation.plot import plot_losses
    from lorakit.evaluation.report import write_outputs

    recipe = plan.recipe
    info = {
        "lorakit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": recipe.name,
        "model": plan.model_label,
        "adapter": str(adapter_dir) if adapter_dir is not None else None,
        **({"start_adapter": start_run[1]} if start_run else {}),
        "config_hash": recipe.config_hash(),
        "data_fingerprint": plan.data_fingerprint,
        "baseline_key": plan.baseline_key,
        "eval": recipe.resolved()["eval"],
    }
    report = write_outputs(
        out_dir,
        info,
        plan.sets,
        plan.metrics,
        base,
        tuned,
        time.time() - started,
        general=general,
        start=start_run[0] if start_run else None,
        harness=harness,
    )
    if adapter_dir is not None and run.metrics.is_file():
        plot_losses(run.metrics, out_dir / "loss.png")
    return report


def _say_results(
    plan: EvalPlan,
    base: list[Any] | None,
    start: list[Any] | None,
    tuned: list[Any] | None,
    general: GeneralScores | None,
    out_dir: Path,
    say: Callable[[str], None],
    harness: HarnessScores | None = None,
) -> None:
    """The scores, one line per split (and the canary's and each lm-eval task's), then where
    the report is."""
    for line in summary_lines(plan.metrics, base, tuned):
        say(line)
    for line in preference_lines(base, start, tuned):
        say(line)
    if general is not None:
        for line in general.lines():
            say(line)
    for line in harness.lines() if harness is not None else []:
        say(line)
    say(f"report: {out_dir / 'report.md'}")


def _score_start_adapter(
    model: Any, plan: EvalPlan, score: Callable[[], Any], say: Callable[[str], None]
) -> tuple[Any, str] | None:
    """With a preference objective and ``train.from_adapter``: the adapter the run started from
    (the SFT model, DPO's reference), loaded next to the trained one, scored, and removed."""
    from lorakit.modeling import start_adapter_dir

    recipe = plan.recipe
    if recipe.train.objective == "sft" or recipe.train.from_adapter is None:
        return None
    folder = start_adapter_dir(recipe, None)  # checked against the base when training
    if folder is None:
        return None
    say(f"scoring the adapter the run started from ({folder})")
    active = model.active_adapter
    model.load_adapter(str(folder), adapter_name="start")
    model.set_adapter("start")
    try:
        return score(), str(folder)
    finally:
        model.set_adapter(active)
        model.delete_adapter("start")


def add_reward_metrics(recipe: Recipe, tuned: list[Any], reference: list[Any] | None) -> None:
    """DPO's implicit reward against its reference (the start adapter, or the base):
    ``reward_accuracy`` (share of held-out pairs whose chosen answer gains more than the
    rejected one) and ``reward_margin`` (mean ``beta`` x margin gain), into ``tuned``."""
    if recipe.train.objective != "dpo" or reference is None:
        return
    beta = recipe.train.beta or 0.1
    for t, r in zip(tuned, reference, strict=True):
        if not t.pair_margins or len(t.pair_margins) != len(r.pair_margins):
            continue
        gains = [beta * (a - b) for a, b in zip(t.pair_margins, r.pair_margins, strict=True)]
        t.metrics["reward_accuracy"] = sum(g > 0 for g in gains) / len(gains)
        t.metrics["reward_margin"] = sum(gains) / len(gains)


def preference_lines(base: Any, start: Any, tuned: Any) -> list[str]:
    """``val: preference accuracy base 50.0% -> start 60.0% -> tuned 80.0% (margin ...)``."""
    lines = []
    groups = [(n, g) for n, g in (("base", base), ("start", start), ("tuned", tuned)) if g]
    for i, res in enumerate(tuned or base or []):
        parts = [
            f"{n} {100 * g[i].metrics['pref_accuracy']:.1f}% (margin "
            f"{g[i].metrics['pref_margin']:+.3f})"
            for n, g in groups
            if "pref_accuracy" in g[i].metrics
        ]
        if parts:
            lines.append(f"{res.split}: preference accuracy " + " -> ".join(parts))
        gaps = [  # KTO's labelled answers
            f"{n} {g[i].metrics['desirable_logp'] - g[i].metrics['undesirable_logp']:+.3f}"
            for n, g in groups
            if {"desirable_logp", "undesirable_logp"} <= g[i].metrics.keys()
        ]
        if gaps:
            lines.append(
                f"{res.split}: desirable minus undesirable answers' log-prob per token "
                + " -> ".join(gaps)
            )
    return lines


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
    """``lorakit eval`` and ``lorakit baseline``: load the base model (quantized and in the
    dtype it was trained in) and, with ``adapter``, the run's saved adapter onto it, then
    :func:`evaluate`. Return the report path (None when there is nothing to score).

    ``ref``: the base model when the caller resolved it already.
    """
    from lorakit.load_run import load_model, prepare_inference

    run = RunDir(run_dir)
    adapter_dir = run.adapter if adapter else None
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file():
        raise RunError(f"{run_dir} has no trained adapter", fix=no_adapter_fix(run_dir))
    with_base = (recipe.eval.baseline if baseline is None else baseline) or not adapter
    loaded = prepare_inference(recipe, components, adapter_dir, ref=ref)
    plan = plan_eval(
        recipe,
        components.metrics,
        _splits_to_score(recipe, components, run, say),
        loaded.formatter,
        loaded.tokenizer,
        loaded.stop_ids,
        loaded.ref.label or loaded.ref.path,
        say,
    )
    if plan is None:
        return None
    model = load_model(loaded, adapter_dir)
    return evaluate(model, plan, run.path, adapter_dir=adapter_dir, with_base=with_base, say=say)


def _score_canary(
    model: Any,
    plan: EvalPlan,
    tuned_too: bool,
    with_base: bool,
    cached: tuple[dict[str, Any], list[Any]] | None,
    say: Callable[[str], None],
) -> GeneralScores | None:
    """The forgetting canary on the base (reused from a matching baseline) and the tuned
    model."""
    canary = plan.canary
    if canary is None:
        return None
    ev = plan.recipe.eval

    def score() -> dict[str, float]:
        return score_canary(
            model,
            canary,
            plan.tokenizer,
            plan.stop_ids,
            plan.recipe.train.per_device_eval_batch_size,
        )

    base = cached_canary(cached[0], canary.digest) if cached is not None else None
    if with_base and base is None:
        say(f"forgetting canary: general text ({canary.counts['examples']} passages), base model")
        if tuned_too:
            with adapter_off(model):
                base = score()
        else:
            base = score()
    tuned = None
    if tuned_too:
        say("forgetting canary: base + adapter")
        tuned = score()
    return GeneralScores(canary, base if with_base else None, tuned, ev.canary_max_rise)


def cached_results(
    report: dict[str, Any], rows: list[dict[str, Any]], sets: list[Any]
) -> list[Any]:
    """Rebuild the base model's results from a reusable baseline folder (with each pair's
    margin, DPO's reference for its reward metrics); a RunError when it cannot give them."""
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
        missing = [i for i in s.ids if i not in by_id]
        if missing:  # one generation per prompt, in order, or none is reusable
            raise RunError(
                f"baseline predictions lack example {missing[0]!r} of split {s.split}",
                fix="rerun `lorakit baseline`",
            )
        gens = [Generation(by_id[i]["base"], by_id[i]["base_stopped"], 0) for i in s.ids]
        margins = entry.get("pair_margins") or []
        if len(margins) != len(s.pairs):  # DPO's reward metrics are measured against them
            raise RunError(
                f"baseline report lacks the base model's pair margins of split {s.split}",
                fix="rerun `lorakit baseline`",
            )
        out.append(
            SplitResult(
                s.split,
                nan_for_null(entry["metrics"]),
                entry["counts"],
                gens,
                [math.nan if m is None else float(m) for m in margins],  # null: a NaN written
            )
        )
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
