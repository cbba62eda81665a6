"""Progress lines for the person at the terminal: ``[lorakit] ...`` on stderr.

Every phase reports through :func:`say`, so results on stdout stay machine-readable; a
secret in a line (a URL's password) is masked.
"""

from __future__ import annotations

import os
import sys


def say(msg: str) -> None:
    """One progress line, from rank 0 only when several processes train (each does the same)."""
    if os.environ.get("RANK", "0") != "0":
        return
    from lorakit.secrets import mask

    print(f"[lorakit] {mask(msg)}", file=sys.stderr, flush=True)


_noted_versions: set[str] = set()


def note_other_version(made_by: object, what: str) -> None:
    """Say once per ``what`` that it was made by another lorakit version (not refused: the
    formats are meant to carry over, but a difference in results may come from it)."""
    from lorakit import __version__

    if not isinstance(made_by, str) or made_by == __version__ or what in _noted_versions:
        return
    _noted_versions.add(what)
    say(f"note: {what} was made by lorakit {made_by}; this is lorakit {__version__}")
