"""TOML recipes: parse, apply command-line overrides, validate every section at once.

A recipe has the sections ``[model] [data] [format] [quant] [peft] [train] [eval] [output]``
and ``[log]``. A section that chooses a plugin holds ``plugin = "<name>"`` next to that
plugin's own options; data sources are a list of ``[[data.sources]]`` tables of the same shape.
Validation collects every problem (with its key path and a fix) and raises one
:class:`RecipeError`.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from lorakit.catalog import Catalog
from lorakit.errors import RecipeError, closest
from lorakit.options import structure, to_plain
from lorakit.sections import (
    DataSection,
    EvalSection,
    LogSection,
    OutputSection,
    TrainSection,
)
from lorakit.toml_limits import limit_problems, parse_failure, scan_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# section -> (plugin kind, default plugin name); sections that choose one plugin
PLUGIN_SECTIONS: dict[str, tuple[str, str]] = {
    "model": ("model", "smollm2-135m-instruct"),
    "format": ("formatter", "chat_template"),
    "quant": ("quant", "none"),
    "peft": ("peft", "lora"),
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
    log: LogSection = LogSection()

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
            "train": to_plain(self.train),
            "eval": to_plain(self.eval),
            "output": {**to_plain(self.output), "name": self.name},
            "log": to_plain(self.log),
        }

    def config_hash(self) -> str:
        # where a run is logged does not change what it trains
        settings = {k: v for k, v in self.resolved().items() if k != "log"}
        blob = json.dumps(settings, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- parsing


def read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        if path.exists() and not path.is_dir() and not path.is_file():
            raise RecipeError(
                [f"{path}: not a regular file (a FIFO, socket or device); pass a .toml file"]
            )
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(
            [f"{path}: no such recipe file; check the path (recipes live in recipes/)"]
        ) from None
    except IsADirectoryError:
        raise RecipeError([f"{path}: is a directory; pass a .toml recipe file"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            [f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8"]
        ) from None
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    if reason := scan_problem(text):
        raise RecipeError([f"{path}: {reason}"])
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python < 3.14 only puts the position in the message: "... (at line 2, column 8)".
        m = re.search(r"^(.*) \(at line (\d+), column (\d+)\)$", str(exc))
        msg, where = (
            (m.group(1), f"{path}:{m.group(2)}:{m.group(3)}") if m else (str(exc), str(path))
        )
        raise RecipeError([f"{where}: invalid TOML: {msg}"]) from None
    except (RecursionError, ValueError) as exc:
        if (reason := parse_failure(exc)) is None:
            raise
        raise RecipeError([f"{path}: {reason}"]) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.max_steps=5`` -> (["train", "max_steps"], 5). Values are TOML; else a string."""
    if "=" not in item:
        raise RecipeError([f"override {item!r}: expected KEY.PATH=VALUE, e.g. train.max_steps=5"])
    key, _, value = item.partition("=")
    keys = [k.strip() for k in key.strip().split(".")]
    if not all(keys):
        raise RecipeError([f"override {item!r}: empty key in {key!r}"])
    if reason := scan_problem(value):
        raise RecipeError([f"override {key.strip()!r}: {reason}"])
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    except (RecursionError, ValueError) as exc:
        if (reason := parse_failure(exc)) is None:
            raise
        raise RecipeError([f"override {key.strip()!r}: {reason}"]) from None
    return keys, parsed


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    problems: list[str] = []
    for item in overrides:
        try:
            keys, value = parse_override(item)
        except RecipeError as exc:
            problems.extend(exc.problems)
            continue
        node: Any = data
        for i, key in enumerate(keys[:-1]):
            nxt = _child(node, key)
            if nxt is None:
                nxt = {}
                if isinstance(node, dict):
                    node[key] = nxt
                else:
                    problems.append(f"override {item!r}: cannot index {'.'.join(keys[: i + 1])}")
                    break
            node = nxt
        else:
            last = keys[-1]
            if isinstance(node, list) and last.isdigit() and int(last) < len(node):
                node[int(last)] = value
            elif isinstance(node, dict):
                node[last] = value
            else:
                problems.append(f"override {item!r}: {'.'.join(keys[:-1])} is not a table")
    return problems


def _child(node: Any, key: str) -> Any:
    if isinstance(node, list):
        return node[int(key)] if key.isdigit() and int(key) < len(node) else None
    if isinstance(node, dict):
        return node.get(key)
    return None


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
    catalog: Catalog, kind: str, table: Any, path: str, default: str | None
) -> tuple[PluginChoice | None, list[str]]:
    if not isinstance(table, Mapping):
        return None, [f"{path}: expected a table, got {type(table).__name__}"]
    name = table.get("plugin", default)
    if name is None:
        known = ", ".join(catalog.names(kind))
        return None, [f'{path}.plugin: required key is missing; add plugin = "<name>" ({known})']
    if not isinstance(name, str):
        return None, [f"{path}.plugin: expected a string, got {name!r}"]
    if name not in catalog.entries[kind]:
        return None, [
            f'{path}.plugin: unknown {kind} plugin "{name}"; {catalog.suggest(kind, name)}'
        ]
    cls = catalog.get(kind, name).options_class
    assert cls is not None
    options, problems = structure(cls, table, path, ignore=("plugin",))
    if options is None:
        return None, problems
    return PluginChoice(kind=kind, name=name, options=options), []


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
    for section, (kind, default) in PLUGIN_SECTIONS.items():
        choice, errs = _plugin_choice(catalog, kind, data.get(section, {}), f"[{section}]", default)
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
        from lorakit.evaluation.config import check_eval

        problems += check_eval(catalog, parts["eval"])
    if parts.get("log") is not None:  # logger names and options come from plugins
        from lorakit.tracking import check_log

        problems += check_log(catalog, parts["log"])

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
                choice, errs = _plugin_choice(catalog, "source", table, f"[data.sources.{i}]", None)
                problems += errs
                if choice is not None:
                    sources.append(choice)
        obj, errs = structure(DataSection, data_table, "[data]", ignore=("sources",))
        problems += errs
        parts["data"] = obj

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
