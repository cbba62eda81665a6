"""``lorakit sweep``: a hyper-parameter search on Optuna over a recipe's keys.

The sweep lives in ``<output.dir>/<name>/``: ``study.db`` (the Optuna study, SQLite, so an
interrupted sweep resumes and several processes on one file system share it), the prepared
``data/splits`` (read once from the recipe's sources; every trial trains and is scored on
exactly these), ``baseline/`` (the base model scored once; each trial's evaluation reuses it),
and one normal run folder per trial (``t000``, ``t001``...), which ``lorakit eval``, ``export``
and ``compare`` open like any other run.

A trial is pruned when its eval loss (the Trainer's ``eval_loss`` at ``train.eval_steps``)
lags behind the other trials' at the same step, by successive halving or Hyperband; the
trials that finish are ranked by the recipe's main metric on the eval split.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from lorakit.catalog import Entry
from lorakit.components import Components, SourceComponent
from lorakit.contracts import SPLITS, Example
from lorakit.errors import LorakitError, RecipeError, RunError
from lorakit.evaluation.numbers import nan_for_null
from lorakit.recipe import Recipe
from lorakit.rundir import read_json
from lorakit.session import open_session
from lorakit.sweep_space import Param, SweepSpec, toml_value

STUDY = "study.db"


@attrs.frozen
class _NoOptions:
    pass


class PreparedSplits:
    """The sweep's prepared splits as a data source: train, then val, then test, each in order
    (splitting them again with the recipe's seed and fractions gives the same splits)."""

    Options = _NoOptions

    def __init__(self, splits: Any):
        self.splits = splits

    def read(self, ctx: Any) -> Iterator[Example]:
        for name in SPLITS:
            yield from self.splits.get(name)


def _prepared(splits: Any) -> SourceComponent:
    entry = Entry(kind="source", name="prepared", factory=PreparedSplits, plugin=__name__)
    return SourceComponent("[sweep] prepared splits", "prepared", PreparedSplits(splits), entry)


@attrs.frozen
class Sweep:
    """A sweep opened: its folder, the recipe as given, what is searched and how it is ranked."""

    folder: Path
    recipe_path: Path
    overrides: tuple[str, ...]
    spec: SweepSpec
    recipe: Recipe
    metric: str
    split: str
    higher_is_better: bool

    @property
    def storage(self) -> str:
        return f"sqlite:///{self.folder / STUDY}"


def open_sweep(recipe_path: str | Path, overrides: Sequence[str], spec: SweepSpec) -> Sweep:
    """The recipe with the sweep's settings checked: every searched key at its extreme values
    is a valid recipe (one RecipeError listing every problem), the metric is one it computes."""
    session = open_session(recipe_path, overrides)
    recipe = session.recipe
    problems: list[str] = []
    for param in spec.space:
        for value in param.corners():
            try:
                open_session(recipe_path, [*overrides, f"{param.key}={toml_value(value)}"])
            except RecipeError as exc:
                problems += [f'[space."{param.key}"] = {value!r}: {p}' for p in exc.problems]
                break
    metrics = session.components.metrics
    metric = spec.sweep.metric or next(iter(metrics), "eval_loss")
    if metric not in metrics:
        problems.append(f"[sweep].metric: {metric!r} is not computed by the recipe's [eval]")
    split = spec.sweep.split or recipe.eval.splits[0]
    if split not in recipe.eval.splits:
        problems.append(f"[sweep].split: {split!r} is not among [eval].splits")
    if recipe.train.eval_steps is None and spec.sweep.pruner != "off":
        problems.append(
            "[train].eval_steps is unset: no eval loss during training to prune on; set it "
            '(e.g. train.eval_steps=20) or [sweep] pruner = "off"'
        )
    if problems:
        raise RecipeError(problems, source=str(spec.path))
    name = spec.sweep.name or f"{recipe.name}-sweep"
    folder = (recipe.output_dir / name).resolve()
    if (folder / "run.json").exists():
        raise RecipeError(
            [
                f"[sweep].name: {folder} is a run's folder, not a study's; a study there would "
                "write its trials and database among that run's files. Name the study: "
                '[sweep] name = "NAME-sweep"'
            ],
            source=str(spec.path),
        )
    return Sweep(
        folder=folder,
        recipe_path=Path(recipe_path),
        overrides=tuple(overrides),
        spec=spec,
        recipe=recipe,
        metric=metric,
        split=split,
        higher_is_better=bool(metrics[metric].higher_is_better),
    )


def prepare(sweep: Sweep, say: Callable[[str], None]) -> SourceComponent:
    """The prepared splits (read and written once, then reused) and the baseline (scored once
    when [eval].baseline), as the source every trial reads."""
    from lorakit.data.pipeline import load_splits, read_split_files, write_splits
    from lorakit.rundir import RunDir

    session = open_session(sweep.recipe_path, sweep.overrides)
    run = RunDir(sweep.folder)
    saved = read_split_files(run.splits)
    if saved is None:
        say(f"preparing the splits in {run.splits} (read once; every trial uses them)")
        read = load_splits(session.components.sources, sweep.recipe.data, sweep.recipe.recipe_dir)
        # Read back through the prepared source once, so the saved examples are exactly what
        # every trial reads (same meta, same fingerprint: the baseline is reusable).
        again = load_splits([_prepared(read)], sweep.recipe.data, sweep.recipe.recipe_dir)
        _require_examples(
            sweep, again, f"give it examples (e.g. data.{sweep.split}_fraction above 0)"
        )
        write_splits(run.splits, again)
        saved = read_split_files(run.splits)
        assert saved is not None
    else:
        say(f"reusing the prepared splits in {run.splits}")
    _require_examples(
        sweep, saved, "start the sweep in a new folder (output.name) with examples in it"
    )
    prepared = _prepared(saved)
    if (
        sweep.recipe.eval.baseline
        and not (sweep.folder / "baseline" / "eval_report.json").is_file()
    ):
        from lorakit.console import say as console
        from lorakit.evaluation.evaluate import evaluate_run

        components = attrs.evolve(session.components, sources=(prepared,))
        evaluate_run(sweep.recipe, components, sweep.folder, adapter=False, say=console)
    return prepared


def _require_examples(sweep: Sweep, splits: Any, fix: str) -> None:
    """Refuse a sweep whose ranking split is empty: every trial would train, then fail."""
    if not len(splits.get(sweep.split)):
        raise RunError(
            f"the {sweep.split} split the sweep ranks trials on holds no example, so no trial "
            "could be scored",
            where="[sweep].split",
            fix=f"{fix}, or rank on another split with [sweep] split",
        )


def suggest(trial: Any, param: Param) -> Any:
    if param.choices:
        return trial.suggest_categorical(param.key, list(param.choices))
    if param.is_int:
        return trial.suggest_int(
            param.key,
            int(param.low or 0),
            int(param.high or 0),
            step=int(param.step or 1),
            log=param.log,
        )
    return trial.suggest_float(
        param.key, float(param.low or 0), float(param.high or 0), step=param.step, log=param.log
    )


def loss_in_direction(sweep: Sweep, loss: float) -> float:
    """An eval loss as the study compares values (its direction is the main metric's); its own
    inverse."""
    return -loss if sweep.higher_is_better else loss


def metric_value(run_dir: Path, metric: str, split: str) -> float:
    """The tuned model's ``metric`` on ``split`` in the run's eval_report.json (not the base's,
    nor a preference run's starting adapter's: ``"role": "start"``)."""
    path = run_dir / "eval_report.json"
    if not path.is_file():
        raise RunError(
            f"the trial wrote no {path.name}: its evaluation scored nothing on {split}",
            where="[sweep].split",
            fix="give the split examples (e.g. data.val_fraction above 0), or rank on another "
            "split with [sweep] split",
        )
    report = read_json(path)
    for res in report.get("results", []):
        tuned = res.get("adapter") and not res.get("role")
        if tuned and res.get("split") == split and metric in res.get("metrics", {}):
            # null: written for NaN (nothing scored); Optuna takes a NaN value as a failed trial
            return float(nan_for_null(res["metrics"])[metric])
    raise RunError(
        f"{run_dir / 'eval_report.json'} has no {metric} for the tuned model on {split}",
        fix="check [eval] metrics and splits",
    )


def objective(sweep: Sweep, prepared: SourceComponent, say: Callable[[str], None]) -> Any:
    """The function Optuna calls per trial: a normal run of the recipe with the trial's values,
    pruned on its eval loss, valued by the main metric."""
    import optuna

    from lorakit.runner import run_recipe
    from lorakit.tracking import watching

    def run_trial(trial: Any) -> float:
        try:
            return train_trial(trial)
        except LorakitError as exc:  # the sweep goes on; the reason is kept with the trial
            trial.set_user_attr("fail_reason", "; ".join(str(exc).split("\n  ")))
            raise

    def train_trial(trial: Any) -> float:
        values = {p.key: suggest(trial, p) for p in sweep.spec.space}
        name = f"t{trial.number:03d}"
        session = open_session(
            sweep.recipe_path,
            [
                *sweep.overrides,
                f"output.dir={toml_value(str(sweep.folder))}",
                f"output.name={toml_value(name)}",
                *(f"{k}={toml_value(v)}" for k, v in values.items()),
            ],
        )
        components: Components = attrs.evolve(session.components, sources=(prepared,))
        run_dir = session.recipe.run_dir
        trial.set_user_attr("run", str(run_dir))
        baseline = sweep.folder / "baseline"
        if baseline.is_dir() and not (run_dir / "baseline").exists():
            shutil.copytree(baseline, run_dir / "baseline")
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        say(f"trial {name}: {shown}")

        def watch(step: int, metrics: Mapping[str, Any]) -> None:
            loss = metrics.get("eval_loss")
            if not isinstance(loss, (int, float)):
                return
            # the study runs in the main metric's direction: a loss is reported negated where
            # that metric is higher-is-better, so the pruner stops the trials losing most.
            # Reported without a pruner too: sweep.json and the table show the losses by step.
            trial.report(loss_in_direction(sweep, float(loss)), step)
            if sweep.spec.sweep.pruner != "off" and trial.should_prune():
                say(f"trial {name}: pruned at step {step} (eval_loss {loss:.4f})")
                raise optuna.TrialPruned(f"eval_loss {loss:.4f} at step {step}")

        with watching(watch):
            run_recipe(session.recipe, components)
        value = metric_value(run_dir, sweep.metric, sweep.split)
        if math.isnan(value):
            raise RunError(
                f"its {sweep.metric} on {sweep.split} is NaN (nothing was scored)",
                where=str(run_dir / "eval_report.json"),
            )
        say(f"trial {name}: {sweep.metric} {value:.4f} on {sweep.split}")
        return value

    return run_trial
