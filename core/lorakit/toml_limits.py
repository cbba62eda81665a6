"""Bounds on a parsed recipe: how deep tables and lists nest, how large an integer may be.

A recipe (or an override) nested thousands deep would exhaust Python's recursion limit in the
TOML parser or in any walk over the recipe, and an integer of thousands of digits cannot even be
printed (Python's int-to-str limit). Both are refused with the key path, before anything else
looks at the recipe.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 64  # no real recipe nests more than a handful of tables deep
INT_MIN, INT_MAX = -(2**63), 2**63 - 1

TOO_DEEP = f"nested more than {MAX_DEPTH} tables or lists deep; flatten it"
INT_FIX = "write large ids or numbers as strings"


def scan_problem(text: str) -> str | None:
    """TOO_DEEP when ``text`` opens more than MAX_DEPTH brackets or joins that many dotted keys.

    A linear pass before ``tomllib`` sees the text: the parser recurses per bracket, and it takes
    quadratic time over a dotted key of 100,000 parts. Strings and comments are skipped.
    """
    i, n, depth, dots = 0, len(text), 0, 0
    while i < n:
        c = text[i]
        if c in "\"'":
            if text.startswith(c * 3, i):
                end = text.find(c * 3, i + 3)
                i = n if end < 0 else end + 3
                continue
            i += 1
            while i < n and text[i] not in (c, "\n"):
                i += 2 if c == '"' and text[i] == "\\" else 1
            i += 1
            continue
        if c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if c in "[{":
            depth, dots = depth + 1, 0
            if depth > MAX_DEPTH:
                return TOO_DEEP
        elif c in "]}":
            depth, dots = max(depth - 1, 0), 0
        elif c in "\n=,":
            dots = 0
        elif c == ".":
            dots += 1
            if dots >= MAX_DEPTH:
                return TOO_DEEP
        i += 1
    return None


def parse_failure(exc: BaseException) -> str | None:
    """What a non-TOMLDecodeError from ``tomllib.loads`` means, or None if it is a bug."""
    if isinstance(exc, RecursionError):
        return TOO_DEEP
    if isinstance(exc, ValueError) and "digits" in str(exc):  # int-to-str/str-to-int limit
        return f"an integer too large to read (over 64 bits); {INT_FIX}"
    return None


def limit_problems(data: Any) -> list[str]:
    """Every key path nested deeper than MAX_DEPTH or holding an integer outside 64 bits.

    Iterative (an explicit stack), so a value nested any depth is reported, not a RecursionError.
    A too-deep branch is reported once, at the first key past the limit, and not walked further.
    """
    problems: list[str] = []
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, dict):
            items: Any = node.items()
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            big = (
                isinstance(node, int)
                and not isinstance(node, bool)
                and not INT_MIN <= node <= INT_MAX
            )
            if big:
                problems.append(f"{path}: integer outside the 64-bit range; {INT_FIX}")
            continue
        if depth >= MAX_DEPTH:
            problems.append(f"{path}: {TOO_DEEP}")
            continue
        for key, value in items:
            stack.append((value, f"{path}.{key}" if path else str(key), depth + 1))
    return sorted(problems)
