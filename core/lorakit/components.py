"""The plugin objects a run uses, built once from a validated recipe.

Validation (:mod:`lorakit.recipe`) checks every option, once; :func:`build_components` then
calls each chosen plugin's factory once with those options and hands back one frozen
:class:`Components`. The runner and the CLI verbs pass these objects down (``load_base_model(ref, components.quant, device)``), so
nothing below them needs a recipe and a catalog to rebuild a plugin, and a test can hand a
function one plugin object. Nothing here imports torch: ``lorakit check`` builds them too.

Adding a component (a new plugin kind) is one field here and one line in
:func:`build_components`.
"""

from __future__ import annotations

from typing import Any

import attrs

from lorakit.catalog import Catalog, Entry
from lorakit.contracts import (
    DataSource,
    ExperimentLogger,
    Formatter,
    Metric,
    ModelSource,
    PeftMethod,
    QuantBackend,
    UsesRecipeFolder,
)
from lorakit.errors import LorakitError, PluginError, RecipeError
from lorakit.recipe import PluginChoice, Recipe, metric_choices
from lorakit.sections import EvalSection


@attrs.frozen
class SourceComponent:
    """One ``[[data.sources]]`` table, built."""

    key: str  # the recipe table, "[data.sources.0]"
    name: str  # the plugin name the table chose
    source: DataSource
    entry: Entry  # its catalog entry: errors name the plugin's module and package


@attrs.frozen
class Components:
    """Every plugin object a recipe chose, each built once (read-only by convention)."""

    model_source: ModelSource  # [model]; resolve it with lorakit.modeling.resolve_model
    sources: tuple[SourceComponent, ...]  # [[data.sources]], in order
    formatter: Formatter  # [format]
    quant: QuantBackend  # [quant]
    peft: PeftMethod  # [peft]
    metrics: dict[str, Metric]  # [eval].metrics, name -> metric, in the recipe's order
    loggers: dict[str, ExperimentLogger]  # [log].plugins (metrics.jsonl is the core's own)


class _Builder:
    """Calls factories, collecting every failure instead of stopping at the first."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.problems: list[str] = []
        self.bug: BaseException | None = None

    def make(self, key: str, kind: str, name: str, options: Any) -> Any:
        from lorakit.data.validate import plugin_label

        try:
            entry = self.catalog.get(kind, name, where=key)
        except PluginError as exc:
            self.problems.append(f"{key}: {exc.message}; {exc.fix}")
            return None
        try:
            return entry.factory(options)
        except LorakitError as exc:
            fix = f"; {exc.fix}" if exc.fix else ""
            self.problems.append(f"{key}: {plugin_label(entry)}: {exc.message}{fix}")
        except ValueError as exc:  # a factory's own check of its options, like a validator's
            self.problems.append(f"{key}: {plugin_label(entry)}: {exc}")
        except Exception as exc:  # a plugin's bug: name it, keep the cause for --debug
            self.problems.append(
                f"{key}: {plugin_label(entry)} failed to build ({type(exc).__name__}: {exc})"
            )
            self.bug = self.bug or exc
        return None

    def choice(self, key: str, choice: PluginChoice) -> Any:
        return self.make(key, choice.kind, choice.name, choice.options)

    def metrics(self, choices: tuple[PluginChoice, ...]) -> dict[str, Any]:
        return {c.name: self.choice(f"[eval].metrics[{i}]", c) for i, c in enumerate(choices)}

    def loggers(self, choices: tuple[PluginChoice, ...]) -> dict[str, Any]:
        return {c.name: self.choice("[log].plugins", c) for c in choices}

    def check(self, source: str | None) -> None:
        """Raise one error listing every problem: a ``PluginError`` when a plugin broke (a bug,
        traceback kept for --debug), else a ``RecipeError``."""
        if self.bug is not None:
            raise PluginError(
                "building the recipe's plugins failed:\n"
                + "\n".join(f"  {p}" for p in self.problems),
                where=source,
                fix="a plugin raised an unexpected error: report it to its author "
                "(--debug shows the traceback)",
            ) from self.bug
        if self.problems:
            raise RecipeError(self.problems, source=source)


def build_components(recipe: Recipe, catalog: Catalog) -> Components:
    """Build every plugin ``recipe`` chose, once. Every factory that fails is reported together,
    each with its recipe key: one ``RecipeError`` (or ``PluginError`` for a plugin's bug)."""
    b = _Builder(catalog)
    parts = Components(
        model_source=b.choice("[model]", recipe.model),
        sources=tuple(
            SourceComponent(
                key=f"[data.sources.{i}]",
                name=choice.name,
                source=b.choice(f"[data.sources.{i}]", choice),
                entry=catalog.entries["source"].get(choice.name),  # type: ignore[arg-type]
            )
            for i, choice in enumerate(recipe.sources)
        ),
        formatter=b.choice("[format]", recipe.format),
        quant=b.choice("[quant]", recipe.quant),
        peft=b.choice("[peft]", recipe.peft),
        metrics=b.metrics(recipe.metrics),
        loggers=b.loggers(recipe.loggers),
    )
    b.check(str(recipe.path))
    for part in (parts.model_source, parts.formatter, parts.quant, parts.peft):
        if isinstance(part, UsesRecipeFolder):  # relative paths mean the recipe's folder
            part.use_recipe_folder(recipe.recipe_dir)
    return parts


def build_metrics(catalog: Catalog, section: EvalSection) -> dict[str, Metric]:
    """name -> metric instance for an ``[eval]`` section alone (reports, tests): validated as a
    recipe validates it, then built."""
    choices, problems = metric_choices(catalog, section)
    if problems:
        raise RecipeError(problems)
    b = _Builder(catalog)
    metrics = b.metrics(choices)
    b.check(None)
    return metrics
