"""Progress lines for the person at the terminal: ``[lorakit] ...`` on stderr.

Every phase reports through :func:`say`, so results on stdout stay machine-readable.
"""

from __future__ import annotations

import sys


def say(msg: str) -> None:
    print(f"[lorakit] {msg}", file=sys.stderr, flush=True)
