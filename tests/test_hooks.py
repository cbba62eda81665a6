"""Each hook in lorakit.hookspecs: documented, and exercised by a test named after it.

A throwaway plugin is registered into a fresh plugin manager for each test; nothing leaks.
"""

from __future__ import annotations

import inspect
import re
from types import SimpleNamespace

import attrs
import pytest
from helpers import REPO
from lorakit import hookimpl, hookspecs
from lorakit.catalog import KINDS, build_catalog, make_manager
from lorakit.errors import PluginError

HOOKS = sorted(n for n, f in vars(hookspecs).items() if n.startswith("lorakit_") and callable(f))


@attrs.frozen
class _Opts:
    size: int = 1


class _Thing:
    Options = _Opts
    quantizes = False  # the class attributes quant backends and metrics must have
    kind = "loss"
    higher_is_better = False

    def __init__(self, options):
        self.options = options


def plugin_for(hook_name: str, name: str = "throwaway"):
    """A throwaway plugin object implementing only ``hook_name``."""

    def impl(register):
        register(name, _Thing)

    impl.__name__ = hook_name
    return SimpleNamespace(**{hook_name: hookimpl(impl)})


@pytest.fixture()
def catalog_with():
    """Build a catalog from a fresh manager with extra throwaway plugins."""

    def build(*plugins, entry_points=True):
        return build_catalog(make_manager(plugins, entry_points=entry_points))

    return build


def test_every_hook_documented_and_tested():
    docs = (REPO / "docs" / "hooks.md").read_text()
    tests_text = "\n".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    assert HOOKS, "no hooks found"
    assert set(KINDS.values()) == set(HOOKS), "every hook fills a plugin kind"
    for name in HOOKS:
        fn = getattr(hookspecs, name)
        doc = inspect.getdoc(fn) or ""
        assert len(doc) > 80, f"{name} needs a docstring saying when it is called and what it gets"
        # the documented call is built from the live signature (datasette's test_docs does
        # the same): a hook that gains or renames an argument fails here until the docs say it
        call = f"{name}({', '.join(inspect.signature(fn).parameters)})"
        assert f"## `{call}`" in docs, f"docs/hooks.md has no section `## {call}`"
        assert re.search(rf"def test_{name}\b", tests_text), f"no test named test_{name}"


def _check_catalog_hook(catalog_with, hook: str, kind: str, builtin: str):
    cat = catalog_with(plugin_for(hook))
    entry = cat.get(kind, "throwaway")
    assert entry.factory is _Thing and entry.options_class is _Opts
    assert builtin in cat.names(kind), f"built-in {kind} {builtin} missing"


@pytest.mark.parametrize(
    ("hook", "attr", "value", "fix"),
    [
        ("lorakit_register_quantizers", "quantizes", None, "quantizes = ..."),
        ("lorakit_register_quantizers", "quantizes", "no", "quantizes = ..."),
        ("lorakit_register_metrics", "kind", "accuracy", '"loss" or "generation"'),
        ("lorakit_register_metrics", "higher_is_better", 1, "higher_is_better = ..."),
    ],
)
def test_class_attributes_the_core_reads_are_checked_at_registration(
    catalog_with, hook, attr, value, fix
):
    broken = type("Broken", (_Thing,), {attr: value})

    def impl(register):
        register("broken", broken)

    impl.__name__ = hook
    with pytest.raises(PluginError) as err:
        catalog_with(SimpleNamespace(**{hook: hookimpl(impl)}))
    assert "'broken' from" in str(err.value) and fix in str(err.value)


def test_lorakit_register_model_sources(catalog_with):
    _check_catalog_hook(
        catalog_with, "lorakit_register_model_sources", "model", "smollm2-135m-instruct"
    )


def test_lorakit_register_sources(catalog_with):
    _check_catalog_hook(catalog_with, "lorakit_register_sources", "source", "chat_jsonl")


def test_lorakit_register_formatters(catalog_with):
    _check_catalog_hook(catalog_with, "lorakit_register_formatters", "formatter", "chat_template")


def test_lorakit_register_quantizers(catalog_with):
    _check_catalog_hook(catalog_with, "lorakit_register_quantizers", "quant", "bnb-4bit")


def test_lorakit_register_peft_methods(catalog_with):
    _check_catalog_hook(catalog_with, "lorakit_register_peft_methods", "peft", "lora")


def test_lorakit_register_metrics(catalog_with):
    _check_catalog_hook(catalog_with, "lorakit_register_metrics", "metric", "perplexity")


def test_lorakit_register_loggers(catalog_with):
    _check_catalog_hook(catalog_with, "lorakit_register_loggers", "logger", "tensorboard")


def test_duplicate_name_names_both_plugins(catalog_with):
    with pytest.raises(PluginError) as info:
        catalog_with(plugin_for("lorakit_register_sources", "chat_jsonl"))
    msg = str(info.value)
    assert "registered twice" in msg and "source_chat_jsonl" in msg


def test_misspelled_hook_fails_loudly():
    bad = SimpleNamespace(lorakit_register_source=hookimpl(lambda register: None))
    with pytest.raises(PluginError) as info:
        make_manager([bad], entry_points=False)
    assert "lorakit_register_source" in str(info.value)


def test_factory_without_options_is_rejected(catalog_with):
    class NoOptions:
        pass

    plugin = SimpleNamespace(
        lorakit_register_metrics=hookimpl(lambda register: register("odd", NoOptions))
    )
    with pytest.raises(PluginError, match="no attrs Options class"):
        catalog_with(plugin, entry_points=False)


def test_fresh_managers_do_not_leak(catalog_with):
    catalog_with(plugin_for("lorakit_register_sources", "leaky"))
    assert "leaky" not in catalog_with().names("source")


def test_old_registry_module_name_is_a_deprecated_alias():
    import importlib
    import sys

    from lorakit import catalog

    sys.modules.pop("lorakit.plugins", None)
    with pytest.warns(DeprecationWarning, match=r"lorakit\.catalog"):
        alias = importlib.import_module("lorakit.plugins")
    assert alias.default_catalog is catalog.default_catalog
    assert alias.KINDS is catalog.KINDS
