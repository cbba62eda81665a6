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
