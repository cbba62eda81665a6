"""Which plugins load: the names in ``LORAKIT_PLUGINS`` and ``LORAKIT_DISABLE_PLUGINS``.

Each variable is a comma-separated list (case, ``-`` and ``_`` do not matter). A name in it is
matched against each of the three names ``lorakit plugins`` shows:

- a plugin's name, as a recipe writes it (``chat_jsonl``, ``csv``): that name alone, the other
  names its entry point registers stay;
- an entry point's name (``source_chat_jsonl``): everything the entry point registers;
- a package's name (``lorakit-csv``): every entry point the package installs.

Entry-point and package names are known before anything is imported, so what they switch off
is never imported. A plugin's name is known only once its entry point has registered:
``LORAKIT_DISABLE_PLUGINS=chat_jsonl`` drops the name after registration, and
``LORAKIT_PLUGINS=csv`` (when ``csv`` names no entry point or package) imports the third-party
entry points not otherwise chosen to find the one that registers it, keeping only that name.
A name that matches nothing is reported once, with the closest known name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Literal

import attrs

from lorakit.errors import closest

DISABLE = "LORAKIT_DISABLE_PLUGINS"
ONLY = "LORAKIT_PLUGINS"


def norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _listed(variable: str) -> dict[str, str] | None:
    """The names a variable lists (normalized -> as written), or None when it is not set."""
    value = os.environ.get(variable)
    if value is None:
        return None
    return {norm(n): n.strip() for n in value.split(",") if n.strip()}


@attrs.define
class Switch:
    """The two variables, read once per plugin manager, and which of their names matched."""

    disabled: dict[str, str]
    only: dict[str, str] | None  # None: not set, every third-party plugin loads
    upfront: set[str]  # entry-point and package names, known without importing anything
    known: dict[str, str] = attrs.field(factory=dict)  # every name met, normalized -> as shown
    matched: set[str] = attrs.field(factory=set)

    @classmethod
    def from_environ(cls, entry_points: Iterable[tuple[str, str]]) -> Switch:
        """``entry_points``: ``(entry point name, package name)`` of every installed one."""
        known = {norm(n): n for pair in entry_points for n in pair if n != "?"}
        return cls(_listed(DISABLE) or {}, _listed(ONLY), set(known), known)

    def before_import(
        self, ep_name: str, package: str, *, builtin: bool
    ) -> Literal["off", "load", "look"]:
        """``off``: switched off by its entry point's or package's name, never imported;
        ``load``; ``look``: import it only to see whether it registers a name ``LORAKIT_PLUGINS``
        lists (see :meth:`verdict`)."""
        names = {norm(ep_name), norm(package)}
        self.matched |= names & (set(self.disabled) | set(self.only or ()))
        if names & set(self.disabled):
            return "off"
        if builtin or self.only is None or names & set(self.only):
            return "load"
        return "look" if set(self.only) - self.upfront else "off"

    def verdict(self, name: str, *, look: bool) -> Literal["keep", "off", "unwanted"]:
        """What becomes of a name an entry point registered: ``keep``; ``off``, switched off by
        that name; ``unwanted``, registered by an entry point imported only to look
        (:meth:`before_import`) but not a name ``LORAKIT_PLUGINS`` lists."""
        key = norm(name)
        self.known.setdefault(key, name)
        if key in self.disabled:
            self.matched.add(key)
            return "off"
        if self.only is not None and key in self.only:
            self.matched.add(key)
            return "keep"
        return "unwanted" if look else "keep"

    def unmatched(self) -> list[str]:
        """One line per listed name that matched nothing, with the closest known name."""
        lines = []
        for variable, names in ((DISABLE, self.disabled), (ONLY, self.only or {})):
            for key, written in names.items():
                if key in self.matched:
                    continue
                close = closest(key, self.known)
                hint = f"; did you mean {self.known[close]!r}?" if close else ""
                lines.append(
                    f"{variable}: {written!r} matches no plugin, entry point or package{hint} "
                    "(`lorakit plugins` shows all three)"
                )
        return lines
