"""A recipe's TOML: the file read (size and nesting limits, UTF-8, error positions) and
``KEY.PATH=VALUE`` overrides applied to it. What the tables mean is :mod:`lorakit.recipe`'s."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.errors import RecipeError
from lorakit.toml_limits import parse_failure, scan_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


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
