"""Validate plain TOML tables against attrs option classes, collecting every problem.

Plugins and recipe sections describe their options as attrs classes whose fields carry a
one-line ``doc`` in their metadata (use :func:`option`). :func:`structure` checks types, unknown
keys (with a did-you-mean) and validators for a table and returns the instance plus a list of
problems, each prefixed with its key path, so a recipe reports all mistakes at once.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

import attrs

from lorakit.errors import closest

_MISSING = object()
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class NestedProblem(ValueError, TypeError):
    """A value inside an option's table is wrong: ``keys`` is its path below the option.

    :func:`structure` reports it at the full key path (``[peft].rank_pattern.q_proj: ...``).
    A ``TypeError`` (for :func:`convert`) and a ``ValueError`` (for validators) both.
    """

    def __init__(self, keys: tuple[str, ...], message: str):
        super().__init__(message)
        self.keys = keys
        self.message = message


class NotAString(TypeError):
    """A string option got a TOML number, boolean or date: ``2024-01-01`` or ``123`` unquoted.
    :func:`structure` adds how to quote it."""

    def __init__(self, message: str, value: Any):
        super().__init__(message)
        self.value = value


def _quote_hint(path: str, key: str, value: Any) -> str:
    """How to write ``value`` as a string, in the recipe and as a command-line override."""
    text = value.isoformat() if isinstance(value, (datetime.date, datetime.time)) else _show(value)
    override = f"{path.strip('[]')}.{key}"
    return f'; quote it: {override}=\'"{text}"\' (in a recipe file: {key} = "{text}")'


def key_path(keys: tuple[str, ...]) -> str:
    """``keys`` as TOML writes a dotted key: bare where it can be, quoted where it must."""
    return ".".join(k if _BARE_KEY.fullmatch(k) else json.dumps(k) for k in keys)


def finite(_inst: Any, attribute: Any, value: float) -> None:
    """A validator for a number option: refuses ``inf`` and ``nan`` (which TOML can spell)."""
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")


def each_value(*validators: Any) -> Any:
    """A validator for a table option that runs ``validators`` on each of its values; a value
    they refuse is reported at its own key (``[peft].rank_pattern.q_proj: ...``)."""

    def check(inst: Any, attribute: Any, value: Mapping[str, Any]) -> None:
        for key, item in value.items():
            for validator in validators:
                try:
                    validator(inst, attribute, item)
                except NestedProblem as exc:
                    raise NestedProblem((str(key), *exc.keys), exc.message) from exc
                except (ValueError, TypeError) as exc:
                    raise NestedProblem((str(key),), _validator_message(exc, item)) from exc

    return check


def option(
    default: Any = attrs.NOTHING,
    *,
    doc: str,
    validator: Any = None,
    factory: Any = None,
    recorded_when_set: bool = False,
) -> Any:
    """An attrs field with a one-line ``doc`` (shown by ``lorakit plugins -v`` and the docs).

    ``recorded_when_set``: :func:`to_plain` leaves the field out while it holds its default, so
    an option added in a later version changes neither the ``resolved.json`` nor the config hash
    of recipes that do not use it (runs trained before it existed still resume and export).
    """
    metadata = {"doc": doc, "recorded_when_set": recorded_when_set}
    if factory is not None:
        return attrs.field(factory=factory, validator=validator, metadata=metadata)
    return attrs.field(default=default, validator=validator, metadata=metadata)


def _at_default(fld: Any, value: Any) -> bool:
    default = fld.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory()
    return bool(value == default)


def describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(_show(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_plural(describe_type(args[0]))}" if args else "a list"
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if args[1:] and args[1] is not Any:
            return f"a table of {_plural(describe_type(args[1]))}"
        return "a table"
    if origin in (Union, types.UnionType):
        parts = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(parts)
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


def _plural(desc: str) -> str:
    for article in ("an ", "a "):
        if desc.startswith(article):
            noun = desc[len(article) :]
            return noun + ("" if noun.endswith("s") else "s")
    return desc


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list" if value else "[]"
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        kind = "date and time" if isinstance(value, datetime.datetime) else type(value).__name__
        return f"{value.isoformat()} (a TOML {kind})"
    return repr(value)


def convert(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` or raise ``TypeError`` describing the expectation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            inner = args[0] if args else Any
            try:
                return tuple(convert(v, inner) for v in value)
            except NotAString as exc:  # the quoting hint is for the option's own value
                raise TypeError(str(exc)) from None
    elif origin in (dict, Mapping) or tp in (dict, Mapping):
        if isinstance(value, Mapping):
            inner = args[1] if args[1:] else Any
            out = {}
            for key, item in value.items():
                try:
                    out[key] = convert(item, inner)
                except NestedProblem as exc:
                    raise NestedProblem((str(key), *exc.keys), exc.message) from exc
                except TypeError as exc:
                    raise NestedProblem((str(key),), str(exc)) from exc
            return out
    elif origin in (Union, types.UnionType):
        nested: NestedProblem | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg)
            except NestedProblem as exc:  # the table matched, a value inside it did not
                nested = nested or exc
            except TypeError:
                continue
        if nested is not None:
            raise nested
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    message = f"expected {describe_type(tp)}, got {_show(value)}"
    if _takes_string(tp) and isinstance(value, _UNQUOTED):
        raise NotAString(message, value)
    raise TypeError(message)


# what an unquoted override or TOML value becomes where a string was meant
_UNQUOTED = (bool, int, float, datetime.date, datetime.time)


def _takes_string(tp: Any) -> bool:
    if tp is str:
        return True
    return typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp)


def fields_of(cls: type) -> tuple[attrs.Attribute, ...]:
    attrs.resolve_types(cls)
    return attrs.fields(cls)


def structure(
    cls: type, table: Mapping[str, Any], path: str, *, ignore: tuple[str, ...] = ()
) -> tuple[Any | None, list[str]]:
    """Build ``cls`` from ``table``. Returns ``(instance or None, problems)``.

    ``path`` prefixes every problem (``[peft]``, ``[data.sources.0]``). Keys in ``ignore`` (such
    as ``plugin``) are skipped.
    """
    problems: list[str] = []
    flds = {f.name: f for f in fields_of(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key in ignore:
            continue
        if key not in flds:
            problems.append(f"{path}.{key}: unknown key{_did_you_mean(key, flds)}")
            continue
        fld = flds[key]
        try:
            value = convert(value, fld.type)
        except NestedProblem as exc:
            problems.append(f"{path}.{key}.{key_path(exc.keys)}: {exc.message}")
            continue
        except NotAString as exc:
            problems.append(f"{path}.{key}: {exc}{_quote_hint(path, key, exc.value)}")
            continue
        except TypeError as exc:
            problems.append(f"{path}.{key}: {exc}")
            continue
        if fld.validator is not None:
            try:
                fld.validator(None, fld, value)
            except NestedProblem as exc:
                problems.append(f"{path}.{key}.{key_path(exc.keys)}: {exc.message}")
                continue
            except (ValueError, TypeError) as exc:
                problems.append(f"{path}.{key}: {_validator_message(exc, value)}")
                continue
        kwargs[key] = value
    for name, fld in flds.items():
        if name not in table and fld.default is attrs.NOTHING:
            doc = fld.metadata.get("doc", "")
            problems.append(
                f"{path}.{name}: required key is missing; add `{name} = ...`"
                + (f" ({doc})" if doc else "")
            )
    if problems:
        return None, problems
    try:
        return cls(**kwargs), []
    except (ValueError, TypeError) as exc:
        return None, [f"{path}: {exc}"]


def _did_you_mean(key: str, known: Mapping[str, Any]) -> str:
    close = closest(key, known)
    if close:
        return f", did you mean {close}?"
    return f"; known keys: {', '.join(sorted(known))}" if known else "; this table takes no keys"


def _validator_message(exc: Exception, value: Any) -> str:
    # attrs' built-in validators put a long tuple in args; keep their first, readable part.
    msg = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    if msg.startswith("'") and "must be in" in msg:
        return f"{_show(value)} is not allowed; {msg.split('must be', 1)[1].strip()}"
    return msg


def describe_options(cls: type) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, doc)`` for each field: for ``lorakit plugins -v`` and docs."""
    rows = []
    for fld in fields_of(cls):
        if fld.default is attrs.NOTHING:
            default = "(required)"
        elif isinstance(fld.default, attrs.Factory):  # type: ignore[arg-type]
            default = _show(fld.default.factory())  # type: ignore[union-attr]
        else:
            default = "(unset)" if fld.default is None else _show(fld.default)
        rows.append((fld.name, describe_type(fld.type), default, fld.metadata.get("doc", "")))
    return rows


def to_plain(obj: Any) -> Any:
    """An attrs instance (or nested values) as TOML/JSON-friendly plain data."""
    if attrs.has(type(obj)):
        return {
            fld.name: to_plain(getattr(obj, fld.name))
            for fld in attrs.fields(type(obj))
            if not (
                fld.metadata.get("recorded_when_set") and _at_default(fld, getattr(obj, fld.name))
            )
        }
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj
