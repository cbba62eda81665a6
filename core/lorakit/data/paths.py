"""Resolve the files a data source reads."""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
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


EMPTY_PATH_FIX = 'give a file or folder, relative to the recipe file ("." for its own folder)'


def non_empty_path(_inst: object, attribute: object, value: str) -> None:
    """A validator for a source's ``path`` option: an empty path is refused when the recipe is
    checked (``resolve`` refuses it too, when the source reads)."""
    if not value:
        raise ValueError(f"the path is empty; {EMPTY_PATH_FIX}")


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


def resolve(recipe_dir: Path, path: str, key: str = "path") -> Path:
    """``path`` from the recipe, relative to the recipe file's folder. An empty path is refused:
    ``Path("")`` is ``.``, so it would read the recipe's whole folder (run outputs included);
    ``key`` names the option in that error."""
    if not path:
        raise DataError(
            "the path is empty",
            where=f"[data.sources].{key}",
            fix=EMPTY_PATH_FIX,
        )
    p = Path(path).expanduser()
    return p if p.is_absolute() else recipe_dir / p


def expand_files(
    recipe_dir: Path,
    path: str,
    glob: str | Sequence[str],
    key: str,
    exclude: Sequence[str] = (),
) -> list[Path]:
    """One file, or the files under a folder matching ``glob`` and no ``exclude`` pattern
    (:func:`matching_files`; sorted, so order is stable)."""
    root = resolve(recipe_dir, path, key)
    if root.is_file():
        return [root]
    refuse_special(root, key)
    if not root.exists():
        raise DataError(
            f"{root} does not exist",
            where=f"[data.sources].{key}",
            fix="paths are relative to the recipe file's folder; check the spelling",
        )
    files = matching_files(root, glob, exclude)
    if not files:
        shown = glob if isinstance(glob, str) else ", ".join(glob)
        raise DataError(
            f"folder {root} has no files matching {shown!r}",
            where=f"[data.sources].{key}",
            fix="point at the right folder, or set glob to the pattern your files follow",
        )
    return files


def matching_files(
    root: Path, include: str | Sequence[str], exclude: Sequence[str] = (), option: str = "glob"
) -> list[Path]:
    """The regular files under the folder ``root`` whose path from ``root`` matches an
    ``include`` pattern and no ``exclude`` one, sorted by that path.

    An include pattern is a glob from ``root`` (``*.jsonl``: the top folder only;
    ``**/*.md``: any depth, ``**`` being any number of folders, none included). An exclude
    pattern matches the end of a path, whole names at a time, and a folder it matches excludes
    everything under it: ``drafts``, ``drafts/**`` and ``**/drafts/**`` all skip every file under
    any folder named drafts. Folders reached through symbolic links are read (a link back to a
    folder already read is skipped and reported); entries that match but are not regular files
    (FIFOs, devices, links to nothing) are reported and never opened. ``option``: the name of
    the include option, for errors."""
    patterns = [include] if isinstance(include, str) else list(include)
    for pattern in [*patterns, *exclude]:
        if not pattern.strip() or Path(pattern).is_absolute():
            raise DataError(
                f"pattern {pattern!r} is {'empty' if not pattern.strip() else 'absolute'}",
                where=f"[data.sources].{option if pattern in patterns else 'exclude'}",
                fix="give a pattern relative to path, e.g. '*.jsonl' or '**/*.md'",
            )
    wanted = [_pattern_regex(p, anchored=True) for p in patterns]
    unwanted = [_pattern_regex(p, anchored=False) for p in exclude]

    def skipped(rel: str) -> bool:
        parts = rel.split("/")
        # the file, or a folder above it
        return any(
            r.fullmatch("/".join(parts[:n])) for r in unwanted for n in range(1, len(parts) + 1)
        )

    found: list[tuple[str, Path]] = []
    seen = {os.path.realpath(root)}
    for folder, dirs, names in os.walk(root, followlinks=True):
        here = Path(folder)
        dirs.sort()  # which of two paths to one folder is read does not depend on the listing
        for d in list(dirs):
            real = os.path.realpath(here / d)
            if real in seen:
                dirs.remove(d)
                rel = (here / d).relative_to(root).as_posix()
                if not skipped(rel):
                    _skipped(here / d, "a folder already read (a link to it, or a loop)")
            else:
                seen.add(real)
        for name in names:
            f = here / name
            rel = f.relative_to(root).as_posix()
            if not any(r.fullmatch(rel) for r in wanted) or skipped(rel):
                continue
            what = _not_a_file(f)
            if what is not None:
                _skipped(f, what)
            elif f.is_file():
                found.append((rel, f))
    return [f for _, f in sorted(found)]


def _pattern_regex(pattern: str, anchored: bool) -> re.Pattern[str]:
    """A glob as a regex over ``/``-separated paths: ``**`` any number of whole names (none
    included), ``*`` and ``?`` within one name, ``[...]`` a class. ``anchored``: from the start
    of the path, else from any name boundary."""
    out = []
    parts = pattern.strip("/").split("/")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
        else:
            out.append(_name_regex(part) + ("" if last else "/"))
    return re.compile(("" if anchored else "(?:.*/)?") + "".join(out), re.DOTALL)


def _name_regex(part: str) -> str:
    """One name's glob (``*``, ``?``, ``[...]``, ``[!...]``) as a regex that never crosses ``/``."""
    out, i = [], 0
    while i < len(part):
        c = part[i]
        end = part.find("]", i + 2 if part[i + 1 : i + 2] in ("!", "]") else i + 1)
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and end != -1:
            body = part[i + 1 : end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            if not negate and body.startswith("^"):
                body = "\\" + body  # a literal ^, as fnmatch reads it
            out.append("[" + ("^/" if negate else "") + body.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def refuse_special(path: Path, key: str) -> None:
    """A FIFO, socket or device (``/dev/zero``) would block or never end: refuse it by name."""
    if path.exists() and not path.is_file() and not path.is_dir():
        raise DataError(
            f"{path} is not a regular file (a FIFO, socket or device)",
            where=f"[data.sources].{key}",
            fix="point at a data file or a folder of them",
        )
