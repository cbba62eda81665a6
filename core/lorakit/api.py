"""The public API for plugin authors: import everything a plugin needs from here, and only here.

Built-in plugins (``lorakit_plugins``) use nothing else, so a third-party package can do all
they do. Names here keep working across lorakit releases; anything else in ``lorakit.*`` is
internal and may move. Importing this module never imports torch or transformers.

Hooks and registration::

    from lorakit.api import DataSource, Example, Message, RegisterSource, hookimpl, option

    @hookimpl
    def lorakit_register_sources(register: RegisterSource) -> None:
        register("my_format", MySource)

The contracts each kind of plugin follows are the protocols below (``DataSource``,
``Formatter``, ``ModelSource``, ``QuantBackend``, ``PeftMethod``, ``Metric`` in its two kinds
``LossMetric`` and ``GenerationMetric``, ``ExperimentLogger``), and the optional capabilities a
plugin may add (``FinishesLoading``, ``DescribesMemory``, ``ComputeDtypeSwitch``,
``FindsTokenizer``, ``ReadsModelConfig``, ``UsesRecipeFolder``, ``HasSystemPrompt``,
``RequiresModules``); the records they exchange are ``Example``/``Message``/``ToolCall``,
``Rendered``/``Segment`` and ``ModelRef``. Errors a
person can act on are ``DataError``, ``ModelError``, ``PluginError`` (each with ``where`` and
``fix``). Shared helpers read files the way the built-in sources do (``iter_json_lines``,
``read_text_file``, ``expand_files``, ``matching_files``, ``resolve_path``, ``parse_meta``),
read tools and tool calls written as JSON (``tools_from_json``, ``tool_calls_from_json``) and
check a record against the contract (``example_problem``); ``read_source`` runs a source
outside a recipe, for a plugin's own tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.contracts import (
    ROLES,
    SPLITS,
    ComputeDtypeSwitch,
    DataSource,
    DescribesMemory,
    DtypeName,
    Example,
    ExperimentLogger,
    FindsTokenizer,
    FinishesLoading,
    Formatter,
    GenerationMetric,
    HasSystemPrompt,
    LogRun,
    LossMetric,
    Message,
    Metric,
    ModelRef,
    ModelSource,
    PeftMethod,
    QuantBackend,
    ReadsModelConfig,
    Rendered,
    RequiresModules,
    Segment,
    SourceContext,
    ToolCall,
    UsesRecipeFolder,
)
from lorakit.data.jsonl import JsonRefused, iter_json_lines, loads_strict, parse_meta
from lorakit.data.paths import expand_files, matching_files, non_empty_path, refuse_special
from lorakit.data.paths import resolve as resolve_path
from lorakit.data.textfile import read_text_file
from lorakit.data.tools import tool_calls_from_json, tools_from_json
from lorakit.data.validate import example_problem
from lorakit.errors import DataError, LorakitError, ModelError, PluginError
from lorakit.hookspecs import (
    RegisterFormatter,
    RegisterLogger,
    RegisterMetric,
    RegisterModelSource,
    RegisterPeftMethod,
    RegisterQuantizer,
    RegisterSource,
    hookimpl,
)
from lorakit.options import each_value, finite, option
from lorakit.rundir import RunDir
from lorakit.safe_yaml import YamlRefused, refuse_unsafe_yaml
from lorakit.secrets import hub_token
from lorakit.tracking import flatten

# ``Turn`` reads better in some plugins; it is the same record as ``Message``.
Turn = Message

__all__ = [
    "ROLES",
    "SPLITS",
    "ComputeDtypeSwitch",
    "DataError",
    "DataSource",
    "DescribesMemory",
    "DtypeName",
    "Example",
    "ExperimentLogger",
    "FindsTokenizer",
    "FinishesLoading",
    "Formatter",
    "GenerationMetric",
    "HasSystemPrompt",
    "JsonRefused",
    "LogRun",
    "LorakitError",
    "LossMetric",
    "Message",
    "Metric",
    "ModelError",
    "ModelRef",
    "ModelSource",
    "PeftMethod",
    "PluginError",
    "QuantBackend",
    "ReadsModelConfig",
    "RegisterFormatter",
    "RegisterLogger",
    "RegisterMetric",
    "RegisterModelSource",
    "RegisterPeftMethod",
    "RegisterQuantizer",
    "RegisterSource",
    "Rendered",
    "RequiresModules",
    "RunDir",
    "Segment",
    "SourceContext",
    "ToolCall",
    "Turn",
    "UsesRecipeFolder",
    "YamlRefused",
    "chat_environment",
    "dtype_from_name",
    "each_value",
    "example_problem",
    "expand_files",
    "finite",
    "flatten",
    "gguf_parsed_once",
    "hookimpl",
    "hub_token",
    "iter_json_lines",
    "loads_strict",
    "matching_files",
    "non_empty_path",
    "option",
    "parse_meta",
    "read_source",
    "read_text_file",
    "refuse_special",
    "refuse_unsafe_yaml",
    "resolve_path",
    "tool_calls_from_json",
    "tools_from_json",
]


def dtype_from_name(name: str, device: str) -> Any:
    """The torch dtype for ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"auto"`` (the measured best
    compute dtype of ``device``). Imports torch: call it from methods, not at import time."""
    from lorakit.device import dtype_from_name as impl

    return impl(name, device)


def gguf_parsed_once() -> Any:
    """A context manager inside which transformers' ``gguf_file=`` loaders parse each GGUF file
    once: a model source that loads a GGUF's config, tokenizer and weights (three parses of
    every vocabulary string otherwise) pays for one."""
    from lorakit.export.gguf_parity import parsed_once

    return parsed_once()


def chat_environment() -> Any:
    """A sandboxed jinja2 environment that renders chat templates as transformers does."""
    from lorakit.data.lite_tokenizer import chat_environment as impl

    return impl()


def read_source(
    factory: type,
    options: dict[str, Any],
    *,
    recipe_dir: Path,
    on_error: str = "fail",
) -> tuple[list[Example], list[tuple[str, str]]]:
    """Run a data source as ``lorakit`` would, outside a recipe: for a plugin's own tests.

    ``options`` is the ``[[data.sources]]`` table (without ``plugin``), validated against
    ``factory.Options`` like a recipe's (a ``RecipeError`` lists every problem). Every record is
    checked against the ``Example`` contract (a ``PluginError`` names the broken one). Returns
    ``(examples, skipped)``, ``skipped`` holding ``(where, reason)`` when ``on_error="skip"``.
    """
    from lorakit.catalog import Entry
    from lorakit.data.pipeline import DataReport, ReadContext
    from lorakit.data.validate import checked_records
    from lorakit.errors import RecipeError
    from lorakit.options import structure

    opts, problems = structure(factory.Options, options, "[data.sources.0]")  # type: ignore[attr-defined]
    if problems:
        raise RecipeError(problems)
    report = DataReport()
    ctx = ReadContext(recipe_dir=Path(recipe_dir), on_error=on_error, report=report)
    entry = Entry(kind="source", name=factory.__name__, factory=factory, plugin=factory.__module__)
    examples = list(checked_records(factory(opts).read, ctx, entry, "[data.sources.0]"))
    return examples, list(report.skipped)
