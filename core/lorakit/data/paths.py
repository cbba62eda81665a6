"""Resolve the files a data source reads."""

from __future__ import annotations

import contextlib
import stat
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path

from lorakit.errors import DataError

# Where expand_files reports a folder entry it skipped (the core's data report while a source
# reads; see ``reporting_skips``). Outside a read, a skip is a warning on stderr.
_SKIPS: ContextVar[Callable[[str], None] | None] = ContextVar("lorakit_skips", default=None)


@contextlib.contextmanager
def reporting_skips(report: Callable[[str], None]) -> Iterator[None]:
    """Inside the block, each file ``expand_files`` skips is passed to ``report`` (one line)."""
    token = _SKIPS.set(report)
    try:
        yield
    finally:
        _SKIPS.reset(token)


def _not_a_file(path: Path) -> str | None:
    """What ``path`` is when it matched a glob but is not a regular file (never opened: a FIFO
    would block, a device never ends), or None for a regular file or a folder."""
    try:
        mode = path.stat().st_mode  # stat, not open: it never blocks, never reads
    except FileNotFoundError:
        return "a symbolic link to nothing" if path.is_symlink() else None
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = (
        "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a regular file"
    )
    return kind + (" (through a symbolic link)" if path.is_symlink() else "")


def _skipped(path: Path, what: str) -> None:
    line = f"skipped {path}: {what}, not a data file (never opened)"
    report = _SKIPS.get()
    if report is not None:
        report(line)
    else:
        from lorakit.console import say

        say(f"warning: {line}")


def resolve(recipe_dir: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else recipe_dir / p


def expand_files(
    recipe_dir: Path, path: str, glob: str, key: str, exclude: tuple[str, ...] = ()
) -> list[Path]:
    """One file, or the files under a folder matching ``glob`` (sorted, so order is stable)."""
    root = resolve(recipe_dir, path)
    if root.is_file():
        return [root]
    refuse_special(root, key)
    if not root.exists():
        raise DataError(
            f"{root} does not exist",
            where=f"[data.sources].{key}",
            fix="paths are relative to the recipe file's folder; check the spelling",
        )
    files = []
    for f in sorted(root.glob(glob)):
        if any(f.match(x) for x in exclude):
            continue
        what = _not_a_file(f)
        if what is not None:
            _skipped(f, what)
        elif f.is_file():
            files.append(f)
    if not files:
        raise DataError(
            f"folder {root} has no files matching {glob!r}",
            where=f"[data.sources].{key}",
            fix="point at the right folder, or set glob to the pattern your files follow",
        )
    return files


def refuse_special(path: Path, key: str) -> None:
    """A FIFO, socket or device (``/dev/zero``) would block or never end: refuse it by name."""
    if path.exists() and not path.is_file() and not path.is_dir():
        raise DataError(
            f"{path} is not a regular file (a FIFO, socket or device)",
            where=f"[data.sources].{key}",
            fix="point at a data file or a folder of them",
        )
