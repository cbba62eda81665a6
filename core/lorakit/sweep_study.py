"""The Optuna side of ``lorakit sweep``: the study in SQLite (resumable, shared by processes),
its pruner and sampler, the loop that runs trials until the study has enough, the ranking."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs

from lorakit.errors import LorakitError, RecipeError, RunError
from lorakit.rundir import json_text
from lorakit.sweep import PreparedSplits, Sweep, loss_in_direction, objective, prepare

HEARTBEAT_S = 30  # a running trial's heartbeat, seconds apart
GRACE_S = 120  # a running trial without a heartbeat this long is stale: failed, tried again


def _optuna() -> Any:
    try:
        import optuna
    except ModuleNotFoundError:
        raise RunError(
            "lorakit sweep needs optuna, which is not installed",
            fix="pip install 'lorakit[sweep]'",
        ) from None
    # ERROR: a failed trial is told in one line by run_sweep, not by Optuna's traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


def pruner(sweep: Sweep) -> Any:
    optuna = _optuna()
    s = sweep.spec.sweep
    first = sweep.recipe.train.eval_steps or 1  # the first step an eval loss is logged at
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=first, max_resource="auto", reduction_factor=s.reduction_factor
        )
    if s.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=first, reduction_factor=s.reduction_factor
        )
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def open_study(sweep: Sweep) -> Any:
    """The sweep's study, created or loaded: SQLite beside the trials' run folders. A process
    that died mid-trial leaves it running; its heartbeat stops, and the next process marks it
    failed and tries those values again."""
    optuna = _optuna()
    sweep.folder.mkdir(parents=True, exist_ok=True)
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna's words
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Optuna 4.9 renamed the callback and its argument; before that, the old names
        on_stale = (
            {"heartbeat_stale_trial_callback": retry(max_retry=1)}
            if retry is not None
            else {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}
        )
        storage = optuna.storages.RDBStorage(
            sweep.storage,
            engine_kwargs={"connect_args": {"timeout": 60}},
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            **on_stale,
        )
    name = sweep.folder.name
    seed = sweep.spec.sweep.seed
    with contextlib.suppress(KeyError):  # trials drawn already: go on from another seed
        seed += len(optuna.load_study(study_name=name, storage=storage).trials)
    sampler = (
        optuna.samplers.RandomSampler(seed=seed)
        if sweep.spec.sweep.sampler == "random"
        else optuna.samplers.TPESampler(seed=seed)
    )
    return optuna.create_study(
        study_name=name,
        storage=storage,
        load_if_exists=True,
        direction="maximize" if sweep.higher_is_better else "minimize",
        sampler=sampler,
        pruner=pruner(sweep),
    )


def identity(sweep: Sweep, fingerprint: str) -> dict[str, str]:
    """What the study's trials are and how they are ranked, as its user attrs: a study resumed
    with any of these changed would rank values of another kind (or in the other direction)
    beside its old ones. ``trials`` is not among them: a study may grow or stop early."""
    space = [attrs.asdict(p) for p in sweep.spec.space]
    return {
        "metric": sweep.metric,
        "split": sweep.split,
        "direction": "maximize" if sweep.higher_is_better else "minimize",
        "space": json.dumps(space, sort_keys=True, default=list),
        "config_hash": sweep.recipe.config_hash(),
        "data_fingerprint": fingerprint,
    }


_IDENTITY_KEYS = {
    "metric": "[sweep].metric",
    "split": "[sweep].split",
    "direction": "[sweep].metric's direction",
    "space": "[space]",
    "config_hash": "the recipe and its overrides (config hash)",
    "data_fingerprint": "the prepared splits (data fingerprint)",
}


def check_identity(sweep: Sweep, study: Any, wanted: dict[str, str]) -> None:
    """Record ``wanted`` on a study that has none (new, or from lorakit before 2026-12-08);
    refuse one started with other settings, naming each difference."""
    held = study.user_attrs
    if not any(k in held for k in wanted):
        for key, value in wanted.items():
            study.set_user_attr(key, value)
        return
    problems = [
        f"{_IDENTITY_KEYS[k]}: the study was started with {held.get(k)!r}, this run has {v!r}"
        for k, v in wanted.items()
        if held.get(k) != v
    ]
    if problems:
        problems.append(
            f"the study in {sweep.folder} ranks trials of its own settings only: give this "
            'search a new name ([sweep] name = "NAME-sweep"), or resume it with the settings '
            "it was started with ([sweep] trials and --trials may change)"
        )
        raise RecipeError(problems, source=str(sweep.spec.path))


def run_sweep(sweep: Sweep, say: Callable[[str], None], trials: int | None = None) -> Any:
    """Run trials until the study holds ``trials`` (``[sweep].trials``) finished, pruned or
    running ones, all processes together; return the study."""
    optuna = _optuna()
    prepared = prepare(sweep, say)
    assert isinstance(prepared.source, PreparedSplits)
    study = open_study(sweep)
    check_identity(sweep, study, identity(sweep, prepared.source.splits.fingerprint))
    want = trials or sweep.spec.sweep.trials
    run_trial = objective(sweep, prepared, say)
    state = optuna.trial.TrialState
    ran: list[Any] = []  # the trial this process ran (others may have added theirs)
    while True:
        fail_stale_trials(study, say)
        count = Counter(t.state for t in study.get_trials(deepcopy=False))
        busy = count[state.COMPLETE] + count[state.PRUNED] + count[state.RUNNING]
        # a stale trial failed above waits to be tried again: fails do not end the sweep then
        if busy >= want or (count[state.FAIL] >= want and not count[state.WAITING]):
            break
        ran.clear()
        study.optimize(
            run_trial,
            n_trials=1,
            catch=(LorakitError,),
            gc_after_trial=True,
            callbacks=[lambda _study, trial: ran.append(trial)],
        )
        for t in ran:
            if t.state == state.FAIL:
                say(f"trial t{t.number:03d} failed: {t.user_attrs.get('fail_reason', '?')}")
    return study


def fail_stale_trials(study: Any, say: Callable[[str], None]) -> None:
    """Fail the trials left running by a process that died (no heartbeat for ``GRACE_S``); the
    storage's callback queues each one's values to be tried again. Optuna does this only as
    a trial starts, and a stale trial counted as running could keep a resume from starting."""
    optuna = _optuna()
    state = optuna.trial.TrialState
    running = {t.number for t in study.get_trials(deepcopy=False, states=(state.RUNNING,))}
    if not running:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    for t in study.get_trials(deepcopy=False, states=(state.FAIL,)):
        if t.number in running:
            say(
                f"trial t{t.number:03d} was left running by a process that stopped: "
                "failed, its values are tried again"
            )


def ranking(sweep: Sweep, study: Any) -> list[dict[str, Any]]:
    """Every trial, the finished ones best first by the main metric, then pruned, then the rest."""
    optuna = _optuna()
    state = optuna.trial.TrialState
    rows = [
        {
            "trial": f"t{t.number:03d}",
            "state": t.state.name,
            # Optuna gives a pruned trial its last eval loss as value: not the main metric
            sweep.metric: t.value if t.state == state.COMPLETE else None,
            "params": dict(t.params),
            "run": t.user_attrs.get("run", ""),
            "reason": t.user_attrs.get("fail_reason") if t.state == state.FAIL else None,
            "eval_losses": {
                str(k): loss_in_direction(sweep, v)
                for k, v in sorted(t.intermediate_values.items())
            },
        }
        for t in study.get_trials(deepcopy=False)
    ]
    sign = -1 if sweep.higher_is_better else 1
    order = {state.COMPLETE.name: 0, state.PRUNED.name: 1}

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        value = r[sweep.metric]
        if value is None:  # pruned: the furthest first, then the lowest eval loss there
            losses = r["eval_losses"]
            last = max(losses, key=int) if losses else "0"
            return (order.get(r["state"], 2), -int(last), losses.get(last, 0.0), r["trial"])
        return (order.get(r["state"], 2), 0, sign * value, r["trial"])

    ranked = sorted(rows, key=key)
    (sweep.folder / "sweep.json").write_text(json_text(ranked, indent=2) + "\n")
    return ranked


def ranking_table(sweep: Sweep, ranked: list[dict[str, Any]]) -> str:
    keys = [p.key for p in sweep.spec.space]
    head = ["rank", "trial", "state", f"{sweep.metric} ({sweep.split})", "last eval_loss", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(ranked, 1):
        value, losses = r[sweep.metric], r["eval_losses"]
        last = max(losses, key=int) if losses else None
        cells = [
            str(i) if r["state"] == "COMPLETE" else "-",
            r["trial"],
            r["state"].lower(),
            f"{value:.4f}" if value is not None else "-",
            f"{losses[last]:.4f} (step {last})" if last else "-",
            *(_cell(r["params"].get(k)) for k in keys),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)
