"""Plugin discovery and the catalog of registered factories.

Built-in and third-party plugins are found the same way: every object in the ``lorakit``
entry-point group is registered with a fresh ``pluggy.PluginManager``. Each catalog hook is then
called once with a ``register`` callback, and the results land in a :class:`Catalog`.

Which plugins load (in the manner of simonw/llm's ``LLM_LOAD_PLUGINS``), by a plugin's name
(``chat_jsonl``), its entry point's name (``source_chat_jsonl``) or its package's name
(``lorakit-csv``), comma-separated (see :mod:`lorakit.plugin_switch` for how each is matched):

- ``LORAKIT_PLUGINS``: load only these third-party plugins (lorakit's own always load);
  set but empty, no third-party plugin loads;
- ``LORAKIT_DISABLE_PLUGINS``: never load these (built-in ones included).

A third-party entry point that fails to import, whose hook raises, or that registers something
breaking the contract (no attrs ``Options``, a wrong class attribute) does not stop anything:
it is skipped whole, listed with its error by ``lorakit plugins`` (:attr:`Catalog.broken`),
reported once per command, and named in the error of a recipe that asks for a plugin it
provides. A built-in plugin (package ``lorakit``) that fails to register is lorakit's bug and
stops every command, saying so; a plugin object registered directly (``make_manager(extra)``,
as tests do) raises its error unchanged.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import pluggy

from lorakit import hookspecs
from lorakit.contracts import METRIC_KINDS
from lorakit.errors import PluginError, cause, closest
from lorakit.plugin_switch import DISABLE, Switch

# plugin kind -> the catalog hook that fills it
KINDS: dict[str, str] = {
    "model": "lorakit_register_model_sources",
    "source": "lorakit_register_sources",
    "formatter": "lorakit_register_formatters",
    "quant": "lorakit_register_quantizers",
    "peft": "lorakit_register_peft_methods",
    "metric": "lorakit_register_metrics",
    "logger": "lorakit_register_loggers",
}


@attrs.frozen
class Entry:
    kind: str
    name: str
    factory: Any
    plugin: str  # the pluggy plugin (module) name that registered it
    distribution: str | None = None
    version: str | None = None

    @property
    def options_class(self) -> type | None:
        return getattr(self.factory, "Options", None)

    @property
    def is_default(self) -> bool:
        """The plugin declares itself its kind's default (``default = True`` on the factory)."""
        return getattr(self.factory, "default", False) is True


@attrs.frozen
class Skipped:
    """An entry point that was not loaded: it failed to import or to register (``error``, with
    the ``step`` that failed) or was switched off by ``LORAKIT_PLUGINS`` /
    ``LORAKIT_DISABLE_PLUGINS`` (``error`` None)."""

    name: str  # the entry point's name
    distribution: str  # "package version", or "?" when unknown
    error: str | None = None
    step: str = "load"  # "load" (import) or "register" (its hook raised, or broke the contract)
    package: str | None = None  # the distribution's name alone: what `pip uninstall` takes
    # (kind, name): registered before it failed, or, when switched off by those names, the
    # ones switched off (its other names are in the catalog)
    provides: tuple[tuple[str, str], ...] = ()

    def line(self) -> str:
        if self.error:
            return f"plugin {self.name} ({self.distribution}) failed to {self.step}: {self.error}"
        if self.provides:
            names = ", ".join(f"{kind} {name}" for kind, name in self.provides)
            return f"{names} of plugin {self.name} ({self.distribution}) switched off"
        return f"plugin {self.name} ({self.distribution}) switched off"

    def way_out(self) -> str:
        """What the user can do about a broken entry point, with the exact names to type."""
        uninstall = f"`pip uninstall {self.package}`" if self.package else "its package"
        return (
            f"upgrade or uninstall its package ({uninstall}), or switch it off with "
            f"LORAKIT_DISABLE_PLUGINS={self.name}"
        )


@attrs.define
class Catalog:
    entries: dict[str, dict[str, Entry]] = attrs.field(factory=lambda: {k: {} for k in KINDS})
    skipped: list[Skipped] = attrs.field(factory=list)
    # names in LORAKIT_PLUGINS / LORAKIT_DISABLE_PLUGINS that matched nothing, one line each
    unmatched: list[str] = attrs.field(factory=list)

    @property
    def broken(self) -> list[Skipped]:
        """Entry points that failed to load."""
        return [s for s in self.skipped if s.error]

    def get(self, kind: str, name: str, *, where: str | None = None) -> Entry:
        try:
            return self.entries[kind][name]
        except KeyError:
            missing = self.not_loaded(kind, name)
            if missing is not None:
                raise PluginError(missing[0], where=where, fix=missing[1]) from None
            raise PluginError(
                f"unknown {kind} plugin {name!r}", where=where, fix=self.suggest(kind, name)
            ) from None

    def not_loaded(self, kind: str, name: str) -> tuple[str, str] | None:
        """``(message, fix)`` when ``name`` is a ``kind`` a skipped entry point registered
        before it failed, or one switched off by name; None when no skipped one did."""
        for s in self.skipped:
            if (kind, name) in s.provides and not s.error:
                return (
                    f'{kind} plugin "{name}" is not loaded: {s.line()}',
                    f"take it out of {DISABLE} (now {os.environ.get(DISABLE, '')!r})",
                )
            if (kind, name) in s.provides:
                package = s.package or "PACKAGE"
                others = ", ".join(self.names(kind)) or "none installed"
                return (
                    f'{kind} plugin "{name}" is not loaded: {s.line()}',
                    f"upgrade it to a version that works (`pip install -U {package}`), or "
                    f"uninstall it (`pip uninstall {package}`) and use another {kind} plugin "
                    f"({others})",
                )
        return None

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def suggest(self, kind: str, name: str) -> str:
        known = self.names(kind)
        close = closest(name, known)
        hint = f"did you mean {close!r}? " if close else ""
        text = f"{hint}installed {kind} plugins: {', '.join(known) or '(none)'}"
        if self.skipped:
            text += "; not loaded: " + "; ".join(
                f"{s.line()} ({s.way_out()})" if s.error else s.line() for s in self.skipped
            )
        return text

    def defaults(self, kind: str) -> list[str]:
        """The plugins of ``kind`` that declare themselves the default (a class attribute
        ``default = True`` on the factory): what a recipe gets when it names none. The core
        knows no plugin by name; the built-in package declares its defaults this way too."""
        return [n for n in self.names(kind) if self.entries[kind][n].is_default]

    def default_for(self, kind: str, key: str) -> tuple[str | None, str | None]:
        """``(name, None)``: the one default plugin of a single-choice ``kind``, or
        ``(None, problem)`` when there is none or several (the recipe must name one at ``key``)."""
        names = self.defaults(kind)
        if len(names) == 1:
            return names[0], None
        known = ", ".join(self.names(kind)) or "(none installed)"
        if not names:
            return None, f'{key}: required key is missing; add plugin = "<name>" ({known})'
        declared = " and ".join(
            _package(e.plugin, e.distribution, e.version)
            for e in (self.entries[kind][n] for n in names)
        )
        return None, (
            f"{key}: required key is missing, and {len(names)} {kind} plugins declare "
            f"themselves the default ({', '.join(names)}: {declared}); name one with "
            f'plugin = "<name>"'
        )

    def all(self) -> Iterable[Entry]:
        for kind in KINDS:
            yield from (self.entries[kind][n] for n in self.names(kind))


def load_entry_points(pm: pluggy.PluginManager) -> list[Skipped]:
    """Register every wanted plugin of the ``lorakit`` entry-point group; return the ones
    skipped (switched off, or failing to import: a broken package stops nothing else)."""
    skipped: list[Skipped] = []
    found = [
        (ep, ep.dist.metadata["Name"] if ep.dist is not None else "?")
        for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT)
    ]
    switch = Switch.from_environ((ep.name, dist_name) for ep, dist_name in found)
    pm.lorakit_switch = switch  # type: ignore[attr-defined]
    for ep, dist_name in found:
        dist = ep.dist
        label = f"{dist_name} {dist.version}" if dist is not None else "?"
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        choice = switch.before_import(ep.name, dist_name, builtin=dist_name == "lorakit")
        if choice == "off":
            skipped.append(Skipped(ep.name, label, package=_or_none(dist_name)))
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party package must not look like our bug
            first = (str(exc).strip().splitlines() or [""])[0]
            error = f"{type(exc).__name__}: {first}"
            skipped.append(Skipped(ep.name, label, error, package=_or_none(dist_name)))
            continue
        pm.register(plugin, name=ep.name)
        pm.lorakit_origins[ep.name] = (dist_name, label, choice == "look")  # type: ignore[attr-defined]
        if dist is not None:
            pm.lorakit_dists[id(plugin)] = (dist_name, dist.version)  # type: ignore[attr-defined]
    return skipped


def _or_none(dist_name: str) -> str | None:
    return None if dist_name == "?" else dist_name


def make_manager(
    extra_plugins: Iterable[Any] = (), *, entry_points: bool = True
) -> pluggy.PluginManager:
    """A fresh plugin manager with every entry-point plugin (and ``extra_plugins``) registered.
    Entry points that were skipped are in ``pm.lorakit_skipped`` (see :func:`load_entry_points`)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.lorakit_dists = {}  # type: ignore[attr-defined]
    # entry point -> (package, label, imported only to look for a name LORAKIT_PLUGINS lists)
    pm.lorakit_origins = {}  # type: ignore[attr-defined]
    pm.lorakit_switch = Switch({}, None, set())  # type: ignore[attr-defined]
    skipped = load_entry_points(pm) if entry_points else []
    pm.lorakit_skipped = skipped  # type: ignore[attr-defined]
    for plugin in extra_plugins:
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            str(exc), fix="hook implementations must be named after a hook in lorakit.hookspecs"
        ) from exc
    return pm


def _distributions(pm: pluggy.PluginManager) -> dict[int, tuple[str, str]]:
    out: dict[int, tuple[str, str]] = dict(getattr(pm, "lorakit_dists", {}))
    for plugin, dist in pm.list_plugin_distinfo():
        out[id(plugin)] = (dist.project_name, dist.version)
    return out


def build_catalog(pm: pluggy.PluginManager) -> Catalog:
    """Call every catalog hook once and collect what plugins register. Each plugin's
    registrations are held until all its hooks have run, then join the catalog together or,
    when a hook raised or broke the contract, not at all (see the module's docstring)."""
    catalog = Catalog(skipped=list(getattr(pm, "lorakit_skipped", [])))
    dists = _distributions(pm)
    origins: dict[str, tuple[str, str, bool]] = getattr(pm, "lorakit_origins", {})
    switch: Switch = getattr(pm, "lorakit_switch", Switch({}, None, set()))
    held: dict[str, _Held] = {}
    for kind, hook_name in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            name = impl.plugin_name
            if name not in held:
                origin = origins.get(name)
                keep = None if origin is None else functools.partial(switch.verdict, look=origin[2])
                held[name] = _Held(name, dists.get(id(impl.plugin)), keep)
            held[name].call(kind, impl)
    for plugin in held.values():
        origin = origins.get(plugin.name)
        if plugin.failure is not None:
            catalog.skipped.append(_failed(plugin, origin))
            continue
        for kind, name, factory in plugin.made:
            _add(catalog, kind, name, factory, plugin.name, plugin.dist)
        if origin is not None and (plugin.dropped or (origin[2] and not plugin.made)):
            package, label, _ = origin
            catalog.skipped.append(
                Skipped(plugin.name, label, package=_or_none(package), provides=plugin.dropped)
            )
    catalog.unmatched = switch.unmatched()
    return catalog


@attrs.define
class _Held:
    """What one plugin registered, kept apart until every hook of it has run."""

    name: str  # the pluggy plugin name: the entry point's name for an installed plugin
    dist: tuple[str, str] | None
    keep: Callable[[str], str] | None = None  # Switch.verdict; None keeps every name
    made: list[tuple[str, Any, Any]] = attrs.field(factory=list)  # (kind, name, factory)
    dropped: tuple[tuple[str, str], ...] = ()  # (kind, name) switched off by name
    failure: Exception | None = None

    def call(self, kind: str, impl: Any) -> None:
        if self.failure is not None:
            return  # skipped whole: its other hooks need not run
        start = len(self.made)

        def register(name: Any, factory: Any) -> None:
            self.made.append((kind, name, factory))

        try:
            impl.function(**{a: register for a in impl.argnames})
            kept = []
            for k, name, factory in self.made[start:]:
                verdict = self.keep(name) if self.keep and isinstance(name, str) else "keep"
                if verdict == "off":  # switched off: what it registered is not checked either
                    self.dropped += ((k, name),)
                elif verdict == "keep":
                    _check(k, name, factory, self.name)
                    kept.append((k, name, factory))
            self.made[start:] = kept
        except Exception as exc:  # the plugin's bug; whose, and what it costs, see _failed
            self.failure = exc


def _failed(plugin: _Held, origin: tuple[str, str, bool] | None) -> Skipped:
    """The record of a third-party entry point that failed to register; raises for one that is
    not an installed third-party entry point."""
    assert plugin.failure is not None
    if origin is None:  # registered directly (a test's throwaway plugin): its error, unchanged
        raise plugin.failure
    exc = plugin.failure
    reason = exc.message if isinstance(exc, PluginError) else cause(exc)
    package, label, _ = origin
    if package == "lorakit":
        raise PluginError(
            f"built-in plugin {plugin.name} ({label}) failed to register: {reason}; this is a "
            "bug in lorakit (or a mix of two lorakit versions in one environment)",
            fix="reinstall lorakit (`pip install --force-reinstall lorakit`) and report it if it "
            f"stays; LORAKIT_DISABLE_PLUGINS={plugin.name} gets the other plugins going meanwhile",
        ) from exc
    provides = tuple((k, n) for k, n, _ in plugin.made if isinstance(n, str))
    return Skipped(plugin.name, label, reason, "register", _or_none(package), provides)


def _check(kind: str, name: Any, factory: Any, plugin: str) -> None:
    """Raise :class:`PluginError` when what ``plugin`` registered breaks the contract."""
    if not isinstance(name, str) or not name:
        raise PluginError(f"plugin {plugin} registered a {kind} with an invalid name {name!r}")
    if not attrs.has(getattr(factory, "Options", None) or object):
        raise PluginError(
            f"{kind} {name!r} from {plugin} has no attrs Options class",
            fix="give the factory an `Options` attrs class describing its recipe options",
        )
    missing = _class_attr_problem(kind, factory)
    if missing:
        attr, want = missing
        raise PluginError(
            f"{kind} {name!r} from {plugin} has {attr} = {getattr(factory, attr, None)!r}",
            fix=f"give the class an attribute `{attr} = ...` set to {want} (see lorakit.api)",
        )


def _add(
    catalog: Catalog, kind: str, name: str, factory: Any, plugin: str, dist: tuple[str, str] | None
) -> None:
    existing = catalog.entries[kind].get(name)
    if existing is not None:
        first = _package(existing.plugin, existing.distribution, existing.version)
        second = _package(plugin, *(dist or (None, None)))
        raise PluginError(
            f"{kind} {name!r} is registered twice: by {first} and by {second}",
            fix="uninstall one of the two packages (`pip uninstall NAME`), or switch one "
            f"plugin off with {DISABLE}={existing.plugin} or {DISABLE}={plugin}",
        )
    catalog.entries[kind][name] = Entry(
        kind=kind,
        name=name,
        factory=factory,
        plugin=plugin,
        distribution=dist[0] if dist else None,
        version=dist[1] if dist else None,
    )


def _package(plugin: str, distribution: str | None, version: str | None) -> str:
    """``plugin`` with the package that installed it (what a user uninstalls)."""
    if distribution is None:
        return f"{plugin} (not from an installed package)"
    return f"{plugin} (package {distribution} {version})"


def _class_attr_problem(kind: str, factory: Any) -> tuple[str, str] | None:
    """The class attribute (besides ``Options``) the core reads from ``factory`` that is missing
    or wrong, with what it should be; None when all are right."""
    if kind == "quant" and not isinstance(getattr(factory, "quantizes", None), bool):
        return "quantizes", "True or False (does the backend load quantized weights?)"
    if kind == "metric":
        if getattr(factory, "kind", None) not in METRIC_KINDS:
            return "kind", '"loss" or "generation"'
        if not isinstance(getattr(factory, "higher_is_better", None), bool):
            return "higher_is_better", "True or False"
    return None


_DEFAULT: Catalog | None = None


def default_catalog() -> Catalog:
    """The catalog of every installed plugin (built once per process)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = build_catalog(make_manager())
        from lorakit.console import say

        for broken in _DEFAULT.broken:  # once per process, on stderr
            say(f"{broken.line()}; skipped ({broken.way_out()})")
        for line in _DEFAULT.unmatched:
            say(line)
    return _DEFAULT


def reset_default_catalog() -> None:
    global _DEFAULT
    _DEFAULT = None


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
