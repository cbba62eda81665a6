"""Recipes: the one place a recipe is validated, every section at once, into a :class:`Recipe`.

A recipe has the sections ``[model] [data] [format] [quant] [peft] [train] [eval] [output]``
and ``[log]``. A section that chooses a plugin holds ``plugin = "<name>"`` next to that
plugin's own options; data sources are a list of ``[[data.sources]]`` tables of the same shape.
``[eval].metrics`` and ``[log].plugins`` choose plugins by name, their options in tables of their
own (``[eval.metric_options.NAME]``, ``[log.options.NAME]``). Every plugin's options are checked
here, once, against its ``Options`` class; :func:`lorakit.components.build_components` only
calls factories. Validation collects every problem (with its key path and a fix) and raises one
:class:`RecipeError`.

This module sits below the plugins' users: it imports the catalog, the option checker and the
section schemas (:mod:`lorakit.sections`), never the run, evaluation or tracking (a test checks
it). Reading the TOML and applying overrides is :mod:`lorakit.recipe_toml`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from lorakit.catalog import Catalog
from lorakit.contracts import ChecksCombinations, RequiresModules
from lorakit.errors import RecipeError, closest
from lorakit.options import structure, to_plain
from lorakit.recipe_toml import apply_overrides, read_toml
from lorakit.sections import (
    DataSection,
    EvalSection,
    LogSection,
    OutputSection,
    TrainSection,
    run_name_problem,
)
from lorakit.toml_limits import limit_problems

# section -> plugin kind; sections that choose one plugin. A section without ``plugin`` gets
# the plugin of that kind that declares itself the default (``Catalog.default_for``).
PLUGIN_SECTIONS: dict[str, str] = {
    "model": "model",
    "format": "formatter",
    "quant": "quant",
    "peft": "peft",
}
PLAIN_SECTIONS: dict[str, type] = {
    "train": TrainSection,
    "eval": EvalSection,
    "output": OutputSection,
    "log": LogSection,
}
SECTIONS = ("model", "data", "format", "quant", "peft", "train", "eval", "output", "log")
SECRET_KEYS = {"token", "hf_token", "hub_token", "use_auth_token", "api_key", "password", "secret"}


@attrs.frozen
class PluginChoice:
    """A chosen plugin and its validated options."""

    kind: str
    name: str
    options: Any

    def to_plain(self) -> dict[str, Any]:
        return {"plugin": self.name, **to_plain(self.options)}


@attrs.frozen
class Recipe:
    path: Path
    text: str  # the recipe file exactly as given
    overrides: tuple[str, ...]
    model: PluginChoice
    sources: tuple[PluginChoice, ...]
    data: DataSection
    format: PluginChoice
    quant: PluginChoice
    peft: PluginChoice
    train: TrainSection
    eval: EvalSection
    output: OutputSection
    log: LogSection
    metrics: tuple[PluginChoice, ...]  # [eval].metrics with their validated options, in order
    loggers: tuple[PluginChoice, ...]  # the always-on logger, then [log].plugins, validated

    @property
    def name(self) -> str:
        return self.output.name or self.path.stem

    @property
    def recipe_dir(self) -> Path:
        return self.path.parent

    @property
    def output_dir(self) -> Path:
        """``output.dir`` with ``~`` expanded (a folder literally named ``~`` is never meant)."""
        return Path(self.output.dir).expanduser()

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name

    def resolved(self) -> dict[str, Any]:
        """Every setting, defaults filled in: what ``resolved.json`` stores and loggers get.
        Credentials inside values (``http://user:PASSWORD@host``) are masked
        (``lorakit.secrets.mask``); the plugins themselves keep the real options."""
        from lorakit.secrets import mask_tree

        return mask_tree(self.settings())

    def settings(self) -> dict[str, Any]:
        """Every setting, defaults filled in, secrets unmasked: never write this anywhere."""
        return {
            "model": self.model.to_plain(),
            "data": {**to_plain(self.data), "sources": [s.to_plain() for s in self.sources]},
            "format": self.format.to_plain(),
            "quant": self.quant.to_plain(),
            "peft": self.peft.to_plain(),
            "train": self.train.plain(),
            "eval": self.eval.plain(),
            "output": {**to_plain(self.output), "name": self.name},
            "log": to_plain(self.log),
        }

    def config_hash(self) -> str:
        # where a run is logged does not change what it trains
        settings = {k: v for k, v in self.resolved().items() if k != "log"}
        blob = json.dumps(settings, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- validation


def _find_secrets(node: Any, path: str, out: list[str]) -> None:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key.lower() in SECRET_KEYS:
                out.append(
                    f"{path}.{key}: secrets never go in recipes (they are copied into run folders);"
                    " remove it and set HF_TOKEN in the environment or a .env file"
                )
            _find_secrets(value, f"{path}.{key}" if path else key, out)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _find_secrets(value, f"{path}.{i}", out)


def _plugin_choice(
    catalog: Catalog, kind: str, table: Any, path: str
) -> tuple[PluginChoice | None, list[str]]:
    if not isinstance(table, Mapping):
        return None, [f"{path}: expected a table, got {type(table).__name__}"]
    name = table.get("plugin")
    if name is None:
        name, problem = catalog.default_for(kind, f"{path}.plugin")
        if name is None:
            return None, [str(problem)]
    if not isinstance(name, str):
        return None, [f"{path}.plugin: expected a string, got {name!r}"]
    if name not in catalog.entries[kind]:
        missing = catalog.not_loaded(kind, name)
        if missing is not None:
            return None, [f"{path}.plugin: {missing[0]}; {missing[1]}"]
        return None, [
            f'{path}.plugin: unknown {kind} plugin "{name}"; {catalog.suggest(kind, name)}'
        ]
    cls = catalog.get(kind, name).options_class
    assert cls is not None
    options, problems = structure(cls, table, path, ignore=("plugin",))
    if options is None:
        return None, problems
    return PluginChoice(kind=kind, name=name, options=options), []


def _named_choices(
    catalog: Catalog,
    kind: str,
    names: Sequence[str],
    tables: Mapping[str, Any],
    list_key: str,
    table_key: str,
) -> tuple[tuple[PluginChoice, ...], list[str]]:
    """Plugins chosen by name in a list (``list_key``, e.g. ``[eval].metrics``) whose options
    sit in tables of their own (``table_key.NAME``). Returns the choices with their options validated, and the
    problems: unknown names (did you mean), names listed twice, tables for a plugin not chosen,
    options the plugin refuses."""
    problems: list[str] = []
    known = catalog.names(kind)
    for i, name in enumerate(names):
        missing = catalog.not_loaded(kind, name) if name not in known else None
        if missing is not None:
            problems.append(f"{list_key}[{i}]: {missing[0]}; {missing[1]}")
        elif name not in known:
            close = closest(name, known)
            hint = f"did you mean {close!r}? " if close else ""
            problems.append(
                f'{list_key}[{i}]: unknown {kind} "{name}"; {hint}'
                f"installed {kind}s: {', '.join(known) or '(none)'}"
            )
    if len(set(names)) != len(names):
        problems.append(f"{list_key}: a {kind} is listed twice; list each once")
    chosen = dict.fromkeys(names)
    options: dict[str, Any] = {}
    for name, table in [*tables.items(), *((n, {}) for n in chosen if n not in tables)]:
        path = f"[{table_key}.{name}]"
        if name not in chosen:
            problems.append(
                f"{path}: {name!r} is not in {list_key}; add it there or remove this table"
            )
        elif not isinstance(table, Mapping):
            problems.append(f"{path}: expected a table of options")
        elif name in known:
            cls = catalog.get(kind, name).options_class
            validated, errs = structure(cls, table, path) if cls else (None, [])
            problems += errs
            if not errs:
                options[name] = validated
    choices = tuple(
        PluginChoice(kind=kind, name=name, options=options[name])
        for name in chosen
        if name in options
    )
    return choices, problems


def metric_choices(
    catalog: Catalog, section: EvalSection
) -> tuple[tuple[PluginChoice, ...], list[str]]:
    """``[eval].metrics`` (unset: the metrics that declare themselves the default) with their
    ``[eval.metric_options]``, validated."""
    return _named_choices(
        catalog,
        "metric",
        catalog.defaults("metric") if section.metrics is None else section.metrics,
        section.metric_options,
        "[eval].metrics",
        "eval.metric_options",
    )


def logger_choices(
    catalog: Catalog, section: LogSection
) -> tuple[tuple[PluginChoice, ...], list[str]]:
    """``[log].plugins`` with their ``[log.options]``, validated (metrics.jsonl is the core's
    own, not a logger); a logger whose Python package is missing is a problem with the install
    line to fix it."""
    choices, problems = _named_choices(
        catalog,
        "logger",
        section.plugins,
        section.options,
        "[log].plugins",
        "log.options",
    )
    for i, name in enumerate(section.plugins):
        entry = catalog.entries["logger"].get(name)
        needs = entry.factory if entry is not None else None
        for module, fix in (needs.requires if isinstance(needs, RequiresModules) else {}).items():
            if importlib.util.find_spec(module) is None:
                problems.append(
                    f'[log].plugins[{i}]: logger "{name}" needs the Python package {module!r}, '
                    f"which is not installed; {fix}"
                )
    return choices, problems


LM_EVAL_INSTALL = "pip install 'lorakit[lmeval]' (or pip install 'lm_eval>=0.4.13,<0.5')"


def lm_eval_problems(section: EvalSection, recipe_dir: Path) -> list[str]:
    """``[eval].lm_eval_*``: the package installed (found, not imported) and the task folder
    there, so a run never trains and then fails to score."""
    problems = []
    if section.lm_eval_tasks and importlib.util.find_spec("lm_eval") is None:
        problems.append(
            "[eval].lm_eval_tasks: lm-evaluation-harness (the Python package 'lm_eval') is not "
            f"installed; {LM_EVAL_INSTALL}, or remove the key"
        )
    if section.lm_eval_include is not None:
        folder = recipe_dir / Path(section.lm_eval_include).expanduser()
        if not folder.is_dir():
            problems.append(
                f"[eval].lm_eval_include: {folder} is not a folder; give the folder that holds "
                "your lm-eval task YAML files (relative to the recipe file)"
            )
        elif not section.lm_eval_tasks:
            problems.append(
                "[eval].lm_eval_include: set but [eval].lm_eval_tasks is empty; name the tasks "
                'to run, e.g. lm_eval_tasks = ["my_task"]'
            )
    return problems


def _combination_problems(catalog: Catalog, parts: dict[str, Any]) -> list[str]:
    """What a [peft] method's options cannot train with the chosen [quant] and [train]: its
    options class may say so (``combination_problems``), naming the keys."""
    peft, quant, train = parts.get("peft"), parts.get("quant"), parts.get("train")
    if peft is None or quant is None or train is None:
        return []
    if not isinstance(peft.options, ChecksCombinations):
        return []
    quantizes = bool(catalog.get("quant", quant.name).factory.quantizes)
    return list(
        peft.options.combination_problems(
            quantizes=quantizes, quant=quant.name, objective=train.objective
        )
    )


def validate(
    data: dict[str, Any], catalog: Catalog, *, path: Path, text: str, overrides: Sequence[str] = ()
) -> Recipe:
    """Turn parsed TOML into a :class:`Recipe` or raise one RecipeError listing every problem."""
    # Bounded first: every walk below (and the secret scan) recurses into the recipe.
    if problems := limit_problems(data):
        raise RecipeError(problems, source=str(path))
    _find_secrets(data, "", problems)
    for key in data:
        if key not in SECTIONS:
            close = closest(key, SECTIONS)
            hint = f", did you mean [{close}]?" if close else f"; sections: {', '.join(SECTIONS)}"
            problems.append(f"[{key}]: unknown section{hint}")

    parts: dict[str, Any] = {}
    for section, kind in PLUGIN_SECTIONS.items():
        choice, errs = _plugin_choice(catalog, kind, data.get(section, {}), f"[{section}]")
        problems += errs
        parts[section] = choice
    for section, cls in PLAIN_SECTIONS.items():
        table = data.get(section, {})
        if not isinstance(table, Mapping):
            problems.append(f"[{section}]: expected a table")
            continue
        obj, errs = structure(cls, table, f"[{section}]")
        problems += errs
        parts[section] = obj

    if parts.get("eval") is not None:  # metric names and options come from plugins
        if parts["eval"].metrics is None:  # recorded as resolved (resolved.json, the hash)
            defaults = tuple(catalog.defaults("metric"))
            parts["eval"] = attrs.evolve(parts["eval"], metrics=defaults)
        parts["metrics"], errs = metric_choices(catalog, parts["eval"])
        problems += errs
        problems += lm_eval_problems(parts["eval"], path.parent)
    if parts.get("log") is not None:  # logger names and options come from plugins
        parts["loggers"], errs = logger_choices(catalog, parts["log"])
        problems += errs

    data_table = data.get("data")
    sources: list[PluginChoice] = []
    if not isinstance(data_table, Mapping):
        problems.append(
            '[data]: missing; add at least one [[data.sources]] table with plugin = "chat_jsonl"'
            ' and path = "..."'
        )
        parts["data"] = None
    else:
        raw_sources = data_table.get("sources")
        if not isinstance(raw_sources, list) or not raw_sources:
            problems.append(
                '[data].sources: add at least one [[data.sources]] table (plugin = "chat_jsonl",'
                ' path = "...")'
            )
        else:
            for i, table in enumerate(raw_sources):
                choice, errs = _plugin_choice(catalog, "source", table, f"[data.sources.{i}]")
                problems += errs
                if choice is not None:
                    sources.append(choice)
        obj, errs = structure(DataSection, data_table, "[data]", ignore=("sources",))
        problems += errs
        parts["data"] = obj

    output = parts.get("output")
    if output is not None and output.name is None and not path.stem.strip("."):
        # a file named "...toml" would name its run ".." (output.dir's parent); any other
        # file name is one path component, kept as it is (spaces included)
        problems.append(
            f"[output].name: unset, so the run is named after the recipe file, but "
            f"{run_name_problem(path.stem)}; set output.name (e.g. output.name=my-run) or "
            "rename the file"
        )
    problems += _combination_problems(catalog, parts)
    if problems:
        raise RecipeError(problems, source=str(path))
    return Recipe(
        path=path,
        text=text,
        overrides=tuple(overrides),
        sources=tuple(sources),
        **parts,
    )


def load_recipe(
    path: str | Path, overrides: Sequence[str] = (), catalog: Catalog | None = None
) -> Recipe:
    """Read, override and validate a recipe file."""
    from lorakit.catalog import default_catalog

    path = Path(path)
    text, data = read_toml(path)
    problems = apply_overrides(data, overrides)
    if problems:
        raise RecipeError(problems, source=str(path))
    return validate(
        data, catalog or default_catalog(), path=path.resolve(), text=text, overrides=overrides
    )
