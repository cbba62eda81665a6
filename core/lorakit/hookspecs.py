"""Every lorakit hook. Plugins implement these with ``@lorakit.hookimpl``.

Each catalog hook hands the plugin a ``register(name, factory)`` callback. A factory is a class
that follows the matching protocol in :mod:`lorakit.contracts` and carries an ``Options`` attrs
class, so a recipe's table for it can be validated without loading anything heavy. A name
registered twice is an error naming both plugins. Hooks are called with keyword arguments; an
implementation may accept only ``register``.

Every hook here must be documented in ``docs/hooks.md`` and exercised by a test of its own;
``tests/test_hooks.py`` fails otherwise (the section heading is the hook's call, built from
this module's signatures).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

from lorakit.contracts import (
    DataSource,
    ExperimentLogger,
    Formatter,
    Metric,
    ModelSource,
    PeftMethod,
    QuantBackend,
)

PROJECT = "lorakit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# The ``register`` callback each catalog hook receives, typed by the protocol its factories
# follow, so mypy checks a plugin's factory against the contract where it is registered.
Register = Callable[[str, Any], None]  # untyped: for hooks without a protocol of their own
RegisterModelSource = Callable[[str, type[ModelSource]], None]
RegisterSource = Callable[[str, type[DataSource]], None]
RegisterFormatter = Callable[[str, type[Formatter]], None]
RegisterQuantizer = Callable[[str, type[QuantBackend]], None]
RegisterPeftMethod = Callable[[str, type[PeftMethod]], None]
RegisterMetric = Callable[[str, type[Metric]], None]
RegisterLogger = Callable[[str, type[ExperimentLogger]], None]


@hookspec
def lorakit_register_model_sources(register: RegisterModelSource) -> None:
    """Register where base weights come from.

    Called once when the plugin catalog is built (``lorakit plugins``, ``check``, ``run``...).
    ``register(name, factory)``: ``factory`` follows :class:`lorakit.contracts.ModelSource`; it
    turns its recipe options into a local folder or Hub id that transformers can load. Chosen by
    ``[model] plugin = "<name>"``. Returns nothing.
    """


@hookspec
def lorakit_register_sources(register: RegisterSource) -> None:
    """Register data sources (readers of a data format).

    Called once when the catalog is built. ``register(name, factory)``: ``factory`` follows
    :class:`lorakit.contracts.DataSource`; it reads files into normalized
    :class:`lorakit.contracts.Example` records, raising ``DataError`` with file and line for bad
    input. Chosen by each ``[[data.sources]] plugin = "<name>"`` table. Returns nothing.
    """


@hookspec
def lorakit_register_formatters(register: RegisterFormatter) -> None:
    """Register prompt formatters.

    Called once when the catalog is built. ``register(name, factory)``: ``factory`` follows
    :class:`lorakit.contracts.Formatter`; it renders an example as text segments, each marked
    supervised or not, so that only assistant content plus its end-of-turn is trained on.
    Chosen by ``[format] plugin = "<name>"``. Returns nothing.
    """


@hookspec
def lorakit_register_quantizers(register: RegisterQuantizer) -> None:
    """Register quantization backends.

    Called once when the catalog is built. ``register(name, factory)``: ``factory`` follows
    :class:`lorakit.contracts.QuantBackend`; it gives the ``quantization_config`` and compute
    dtype for loading the base model and prepares a quantized model for training. Chosen by
    ``[quant] plugin = "<name>"``. Returns nothing.
    """


@hookspec
def lorakit_register_peft_methods(register: RegisterPeftMethod) -> None:
    """Register parameter-efficient fine-tuning methods.

    Called once when the catalog is built. ``register(name, factory)``: ``factory`` follows
    :class:`lorakit.contracts.PeftMethod`; it builds the ``peft.PeftConfig`` that wraps the base
    model. Chosen by ``[peft] plugin = "<name>"``. Returns nothing.
    """


@hookspec
def lorakit_register_metrics(register: RegisterMetric) -> None:
    """Register evaluation metrics.

    Called once when the catalog is built. ``register(name, factory)``: ``factory`` follows
    :class:`lorakit.contracts.Metric`; it scores a split either from token losses or from
    generated text against references. Chosen by name in ``[eval] metrics``. Returns nothing.
    """


@hookspec
def lorakit_register_loggers(register: RegisterLogger) -> None:
    """Register experiment loggers (trackers such as TensorBoard or MLflow).

    Called once when the catalog is built. ``register(name, factory)``: ``factory`` follows
    :class:`lorakit.contracts.ExperimentLogger`; it receives the run's parameters, every
    logged train/eval metric by step, the final evaluation and the run's output files, on rank 0
    only and off the training thread. Chosen by name in ``[log] plugins``. Returns nothing.
    """
