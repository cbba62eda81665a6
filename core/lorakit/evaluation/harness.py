"""lm-evaluation-harness tasks (``[eval].lm_eval_tasks``) on the model in memory.

The tuned model is scored as it stands, base + adapter (not merged: lm-eval's ``HFLM`` takes the
PEFT model object), and the base with the adapter switched off, like the eval splits and the
forgetting canary. Local tasks (``[eval].lm_eval_include``, a folder of task YAMLs over local
files) need no network; lm-eval's own tasks (``arc_easy``, ``hellaswag``, ...) download their
data from the Hub. Each task's scores are results of split ``lm_eval/<task>`` in
``eval_report.json``, so ``lorakit compare`` and the loggers read them like any split's; the
report's ``lm_eval`` entry says what was run.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from lorakit.data.jsonl import json_strings
from lorakit.errors import RunError, cause, closest
from lorakit.evaluation.numbers import fmt, nan_for_null
from lorakit.qpissa import adapter_off
from lorakit.recipe import LM_EVAL_INSTALL, Recipe

PREFIX = "lm_eval/"  # a task's results are split "lm_eval/<task>"
# datasets' packaged builders: a task's dataset_path that names one reads data_files
BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder", "audiofolder")


@attrs.frozen
class HarnessPlan:
    """What ``[eval].lm_eval_*`` asks for, resolved against the recipe's folder."""

    tasks: tuple[str, ...]
    include: Path | None
    limit: int | None
    num_fewshot: int | None
    batch_size: int

    @property
    def digest(self) -> str:
        """Everything the scores depend on besides the model: a base scored with the same
        digest (a reused baseline's) is reused too."""
        blob = {
            "tasks": list(self.tasks),
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
            "lm_eval": lm_eval_version(),
            "include": _folder_digest(self.include) if self.include is not None else None,
            "data": _task_data_digest(self.include) if self.include is not None else None,
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def plan_harness(recipe: Recipe) -> HarnessPlan | None:
    """The recipe's lm-eval tasks, or None when it asks for none."""
    ev = recipe.eval
    if not ev.lm_eval_tasks:
        return None
    include = ev.lm_eval_include
    return HarnessPlan(
        tasks=tuple(ev.lm_eval_tasks),
        include=(recipe.recipe_dir / Path(include).expanduser()).resolve() if include else None,
        limit=ev.lm_eval_limit,
        num_fewshot=ev.lm_eval_num_fewshot,
        batch_size=ev.lm_eval_batch_size,
    )


def _folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _task_data_digest(folder: Path) -> str:
    """The local files the task YAMLs in ``folder`` read (``dataset_kwargs.data_files`` and
    ``data_dir``, a ``dataset_path`` that is a local path), resolved as ``datasets`` resolves
    them (against the working directory; the YAML's folder as well, to be safe): a changed
    data file changes the digest, so a baseline's lm-eval scores are not reused over it."""
    import glob

    h = hashlib.sha256()
    for yml in sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml")):
        for name in sorted(set(_named_paths(_yaml_data(yml)))):
            for base in (Path.cwd(), yml.parent):
                pattern = str(base / Path(name).expanduser())
                for hit in sorted(glob.glob(pattern, recursive=True)):
                    path = Path(hit)
                    files = (
                        sorted(f for f in path.rglob("*") if f.is_file())
                        if path.is_dir()
                        else [path]
                    )
                    for f in files:
                        h.update(str(f.resolve()).encode() + b"\0")
                        try:
                            h.update(hashlib.sha256(f.read_bytes()).digest())
                        except OSError:  # lm-eval will say what is wrong with it
                            h.update(b"unreadable")
    return h.hexdigest()[:16]


def _yaml_data(path: Path) -> Any:
    """A task YAML as plain data; lm-eval's tags (``!function utils.x``) read as None, and a
    file that cannot be parsed as nothing (its bytes are in the folder digest anyway)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, _tag, node: None)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError):
        return None


def _named_paths(config: Any) -> Iterator[str]:
    """The local paths a task config names for its data."""
    if not isinstance(config, dict):
        return
    kwargs = config.get("dataset_kwargs")
    if isinstance(kwargs, dict):
        for key in ("data_files", "data_dir"):
            yield from json_strings(kwargs.get(key))
    path = config.get("dataset_path")
    if isinstance(path, str) and path not in BUILDERS:  # a local folder, when one is there
        yield path


def lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        raise RunError(
            "[eval].lm_eval_tasks: lm-evaluation-harness (the Python package 'lm_eval') is not "
            "installed",
            fix=LM_EVAL_INSTALL,
        ) from None


@contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's INFO/WARNING lines (seeds, 'pretrained is not a str') are noise here."""
    import logging

    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def task_manager(plan: HarnessPlan) -> Any:
    """lm-eval's task index with every task of ``plan`` in it. Local tasks alone when they are
    all in ``include`` (lm-eval's own index reads thousands of YAML files: seconds); an
    unknown task is a RunError with the closest names."""
    lm_eval_version()
    with _quiet():
        from lm_eval.tasks import TaskManager

        include = str(plan.include) if plan.include is not None else None
        if include is not None:
            local = TaskManager(include_path=include, include_defaults=False)
            if all(t in local.all_tasks for t in plan.tasks):
                return local
        manager = TaskManager(include_path=include)
    unknown = [t for t in plan.tasks if t not in manager.all_tasks]
    if unknown:
        close = closest(unknown[0], manager.all_tasks)
        hint = f" (did you mean {close!r}?)" if close else ""
        where = f" nor in {plan.include}" if plan.include is not None else ""
        raise RunError(
            f"[eval].lm_eval_tasks: {unknown[0]!r} is not an lm-eval task{hint}: not one of "
            f"lm-eval's own{where}",
            fix="`lm-eval ls tasks` lists lm-eval's tasks; a local task needs a YAML with "
            "`task: NAME` in [eval].lm_eval_include",
        )
    return manager


def check_tasks(recipe: Recipe) -> None:
    """Before training: every lm-eval task the recipe names exists (not after hours)."""
    plan = plan_harness(recipe)
    if plan is not None:
        task_manager(plan)


def score_tasks(model: Any, tokenizer: Any, plan: HarnessPlan, manager: Any) -> dict[str, Any]:
    """``{task: {"metrics", "higher_is_better", "examples"}}`` for ``model`` as it stands
    (adapter on or off). lm-eval gets its own copy of the tokenizer (it may set a pad token)."""
    import copy

    with _quiet():
        from lm_eval import simple_evaluate

        lm = _model_class()(
            pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=plan.batch_size
        )
        try:
            out = simple_evaluate(
                model=lm,
                tasks=list(plan.tasks),
                task_manager=manager,
                limit=plan.limit,
                num_fewshot=plan.num_fewshot,
                log_samples=False,
                bootstrap_iters=0,  # no stderr: base vs tuned on the same items
            )
        except (OSError, ConnectionError) as exc:  # the task's dataset is not here
            raise RunError(
                f"lm-eval could not load the data of {', '.join(plan.tasks)} ({cause(exc)})",
                fix="lm-eval downloads each task's dataset from the Hugging Face Hub on first "
                "use: run once where the Hub is reachable (the datasets cache keeps it), or "
                "name local task YAMLs with --lm-eval-include",
            ) from exc
    if out is None:  # only on a non-zero rank of a distributed lm-eval run
        raise RunError("lm-eval returned no results", fix="run the evaluation in one process")
    return parse_results(out)


def _model_class() -> Any:
    """lm-eval's ``HFLM``; without lorakit's progress bars (not a terminal), one that draws
    no bar over its requests either."""
    from lm_eval.models.huggingface import HFLM

    from lorakit.progress import enabled

    if enabled():
        return HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def _loglikelihood_tokens(
            self, requests: Any, disable_tqdm: bool = False, override_bs: Any = None
        ) -> Any:  # the rolling path asks for a bar whatever it was given
            return super()._loglikelihood_tokens(
                requests, disable_tqdm=True, override_bs=override_bs
            )

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


def _name(text: str) -> str:
    """A name every tracker accepts (letters, digits, ``_ . -``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "_"


def parse_results(out: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's results as ``{task: {"metrics": {name: value}, "higher_is_better", "examples"}}``:
    ``acc,none`` is ``acc``, ``exact_match,strict-match`` is ``exact_match_strict-match``;
    stderr entries and entries with no number (a group without an aggregate) are left out."""
    higher_all = out.get("higher_is_better", {})
    samples = out.get("n-samples", {})
    scores: dict[str, Any] = {}
    for task, entry in out.get("results", {}).items():
        metrics: dict[str, float] = {}
        higher: dict[str, bool] = {}
        for key, value in entry.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float)):
                continue
            name = _name(metric if filt == "none" else f"{metric}_{filt}")
            metrics[name] = float(value)
            higher[name] = bool(higher_all.get(task, {}).get(metric, True))
        if metrics:
            n = samples.get(task, {}).get("effective")
            scores[_name(task)] = {
                "metrics": metrics,
                "higher_is_better": higher,
                "examples": n if isinstance(n, int) else None,
            }
    return scores


@attrs.frozen
class HarnessScores:
    """lm-eval's scores of one evaluation, and how they go into its report."""

    plan: HarnessPlan
    version: str
    base: dict[str, Any] | None
    tuned: dict[str, Any] | None

    def _groups(self) -> list[tuple[str, dict[str, Any]]]:
        return [(n, g) for n, g in (("base", self.base), ("tuned", self.tuned)) if g is not None]

    def tasks(self) -> list[str]:
        return list(dict.fromkeys(t for _, g in self._groups() for t in g))

    def kinds(self) -> tuple[dict[str, str], dict[str, bool]]:
        """How each metric reads: a higher-is-better share in [0, 1] in points ("generation"),
        anything else as a number ("loss")."""
        values: dict[str, list[float]] = {}
        higher: dict[str, bool] = {}
        for _, group in self._groups():
            for entry in group.values():
                for name, value in entry["metrics"].items():
                    values.setdefault(name, []).append(value)
                    higher[name] = entry["higher_is_better"].get(name, True)
        kinds = {
            name: "generation"
            if higher[name] and all(0.0 <= v <= 1.0 for v in vs if not math.isnan(v))
            else "loss"
            for name, vs in values.items()
        }
        return kinds, higher

    def results(self, model: str, adapter: str | None) -> list[dict[str, Any]]:
        """Rows for ``eval_report.json``'s results, one per task and model."""
        rows = []
        for label, group in self._groups():
            for task, entry in group.items():
                rows.append(
                    {
                        "model": model,
                        "adapter": adapter if label == "tuned" else None,
                        "split": PREFIX + task,
                        "metrics": entry["metrics"],
                        "counts": {"examples": entry["examples"]},
                    }
                )
        return rows

    def section(self) -> dict[str, Any]:
        """``eval_report.json``'s ``lm_eval`` entry."""
        kinds, higher = self.kinds()
        return {
            "digest": self.plan.digest,
            "lm_eval_version": self.version,
            "tasks": list(self.plan.tasks),
            "include": str(self.plan.include) if self.plan.include is not None else None,
            "limit": self.plan.limit,
            "num_fewshot": self.plan.num_fewshot,
            "metric_kinds": kinds,
            "higher_is_better": higher,
        }

    def _pairs(self, task: str) -> Iterator[tuple[str, float | None, float | None]]:
        names: list[str] = []
        for _, group in self._groups():
            names += [n for n in group.get(task, {}).get("metrics", {}) if n not in names]
        for name in names:
            b = (self.base or {}).get(task, {}).get("metrics", {}).get(name)
            t = (self.tuned or {}).get(task, {}).get("metrics", {}).get(name)
            yield name, b, t

    def lines(self) -> list[str]:
        """What the run says: one line per task."""
        kinds, _ = self.kinds()
        out = []
        for task in self.tasks():
            parts = [
                f"{n} {fmt(b, kinds[n])} -> {fmt(t, kinds[n])}"
                if b is not None and t is not None
                else f"{n} {fmt(b if t is None else t, kinds[n])}"
                for n, b, t in self._pairs(task)
            ]
            out.append(f"lm-eval {task}: {', '.join(parts)}")
        return out

    def markdown(self) -> list[str]:
        kinds, higher = self.kinds()
        lines = [f"## lm-evaluation-harness (lm_eval {self.version})", ""]
        lines += ["| task | metric | base | tuned | change |", "|---|---|---:|---:|---:|"]
        for task in self.tasks():
            for name, b, t in self._pairs(task):
                kind = kinds[name]
                change = ""
                if b is not None and t is not None and not (math.isnan(b) or math.isnan(t)):
                    d = (t - b) * (100 if kind == "generation" else 1)
                    change = f"{d:+.1f}" if kind == "generation" else f"{d:+.4f}"
                    change += (" (better)" if (d > 0) == higher[name] else " (worse)") if d else ""
                lines.append(f"| {task} | {name} | {fmt(b, kind)} | {fmt(t, kind)} | {change} |")
        lines.append("")
        return lines


def cached_harness(report: dict[str, Any], digest: str) -> dict[str, Any] | None:
    """The base model's lm-eval scores from a reused baseline report, when it ran the same
    tasks the same way."""
    section = report.get("lm_eval")
    if not isinstance(section, dict) or section.get("digest") != digest:
        return None
    higher = section.get("higher_is_better") or {}
    out: dict[str, Any] = {}
    for entry in report.get("results", []):
        split = entry.get("split") or ""
        if split.startswith(PREFIX) and entry.get("adapter") is None:
            metrics = nan_for_null(entry.get("metrics") or {})
            out[split[len(PREFIX) :]] = {
                "metrics": metrics,
                "higher_is_better": {n: bool(higher.get(n, True)) for n in metrics},
                "examples": (entry.get("counts") or {}).get("examples"),
            }
    return out or None


def score_harness(
    model: Any,
    tokenizer: Any,
    plan: HarnessPlan,
    *,
    tuned_too: bool,
    with_base: bool,
    cached_report: dict[str, Any] | None,
    say: Callable[[str], None],
) -> HarnessScores:
    """The tasks on the base (reused from a matching baseline, else with the adapter switched
    off) and on base + adapter."""
    manager = task_manager(plan)
    tasks = ", ".join(plan.tasks)
    base = cached_harness(cached_report, plan.digest) if cached_report is not None else None
    reused = base is not None
    if with_base and base is None:
        say(f"lm-eval {tasks}: base model")
        if tuned_too:
            # the frozen base exactly: a QPiSSA model's original 4-bit weights back in place of
            # its residual (qpissa.adapter_off), as the eval splits and the canary score it
            with adapter_off(model):
                base = score_tasks(model, tokenizer, plan, manager)
        else:
            base = score_tasks(model, tokenizer, plan, manager)
    tuned = None
    if tuned_too:
        say(f"lm-eval {tasks}: base + adapter")
        tuned = score_tasks(model, tokenizer, plan, manager)
        differ = _different_counts(base, tuned) if reused else []
        if differ:  # never base vs tuned over different documents
            say(
                f"lm-eval {differ[0]}: the baseline's base scores cover another number of "
                "documents than base + adapter now; scoring the base model again"
            )
            with adapter_off(model):
                base = score_tasks(model, tokenizer, plan, manager)
    return HarnessScores(plan, lm_eval_version(), base if with_base else None, tuned)


def _different_counts(base: dict[str, Any] | None, tuned: dict[str, Any]) -> list[str]:
    """The tasks whose base and tuned scores cover a different number of documents."""
    if base is None:
        return []
    return [
        task
        for task, entry in tuned.items()
        if task not in base or base[task].get("examples") != entry.get("examples")
    ]
