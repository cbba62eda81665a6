"""Domain errors: each one says where the problem is and what to do about it.

The CLI prints these as one or two lines and exits non-zero; ``--debug`` shows the traceback.
Anything that is not a ``LorakitError`` is a bug in lorakit or a plugin and keeps its traceback.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

# Control characters (but newline and tab) and bidirectional overrides: a terminal would act on
# them (escape sequences can retitle the window, move the cursor, hide text) instead of showing.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` safe to print: control characters shown as escapes (``\\x1b``), not acted on."""
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)


class LorakitError(Exception):
    """Base class: ``where`` (file:line, key path, example id) plus ``fix`` (what to do)."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.fix = fix

    def __str__(self) -> str:
        head = f"{self.where}: {self.message}" if self.where else self.message
        return f"{head}\n  fix: {self.fix}" if self.fix else head


class RecipeError(LorakitError):
    """One or more problems in a recipe. ``problems`` holds every one, each with its key path."""

    def __init__(self, problems: Sequence[str], *, source: str | None = None):
        self.problems = list(problems)
        count = len(self.problems)
        header = f"{source}: " if source else ""
        header += f"{count} problem{'s' if count != 1 else ''} in recipe"
        super().__init__(header + "\n" + "\n".join(f"  {p}" for p in self.problems))

    def __str__(self) -> str:
        return self.message


class PluginError(LorakitError):
    """A plugin is missing, registered twice, or broke its contract."""


class DataError(LorakitError):
    """A data file is malformed or an example breaks the contract."""


class ModelError(LorakitError):
    """A base model cannot be found, downloaded or loaded."""


class RunError(LorakitError):
    """A run folder, checkpoint or adapter is missing, incomplete or would be overwritten."""


def cause(exc: BaseException, limit: int = 200) -> str:
    """A library's exception in one line for a lorakit error: its class and the first line of
    its message (at most ``limit`` characters), or the class alone when it has no message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to a misspelled ``name`` (for "did you mean ...?"), or None."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return close[0] if close else None
