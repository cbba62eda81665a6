"""Files in a run folder, created, written and read without following anything planted there.

- ``make_folder``: ``output.dir`` and the run folder, or a ``RunError`` naming the key when the
  place is read-only, not writable, or under a regular file (instead of a traceback).
- ``write_text``: atomic (a temporary file created exclusively, never through a link, then
  renamed over the target: a link planted at the target is replaced, never written through).
- ``refuse_links``: a run folder holds no symbolic links (lorakit never makes one), so a link
  found in it was planted; commands that read or write the run refuse it by name.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from lorakit.errors import RunError

# Under checkpoints/ a link is checked where it is used: a checkpoint folder linked from another
# run is skipped by auto and refused when named (lorakit.checkpoints).
_NOT_SCANNED = frozenset({"checkpoints"})


def make_folder(path: Path, key: str = "output.dir", run_folder: Path | None = None) -> None:
    """``path`` and its parents, or a ``RunError`` saying why they cannot be made. A file in
    the way at ``run_folder`` (the run folder itself, named by ``output.name``) or inside it
    names ``output.name``; one above it, ``key``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        return
    except (NotADirectoryError, FileExistsError):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        if run_folder is not None and (blocker == run_folder or run_folder in blocker.parents):
            raise RunError(
                f"{blocker} is a file, not a folder, so the run folder {run_folder} cannot be "
                "made there",
                where="output.name",
                fix=f"choose another output.name (e.g. output.name={run_folder.name}-run), "
                "or move the file away",
            ) from None
        raise RunError(
            f"{blocker} is a file, not a folder, so the run folder {path} cannot be made there",
            where=key,
            fix=f"set {key} to a folder (or a path where one can be made), or move the file away",
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        why = "a read-only file system" if exc.errno == errno.EROFS else "permission denied"
    place = next((p for p in [path, *path.parents] if p.exists()), path)
    raise RunError(
        f"{place} is not writable ({why}), so the run folder {path} cannot be made",
        where=key,
        fix=f"set {key} to a folder you can write to (e.g. {key}=~/lorakit-runs), "
        "or make this one writable",
    )


def not_writable(exc: OSError, path: Path, key: str = "output.dir") -> RunError | None:
    """The ``RunError`` for a write into ``path`` refused by permissions or a read-only file
    system; None for any other failure."""
    if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
        return None
    why = "a read-only file system" if exc.errno == errno.EROFS else "permission denied"
    return RunError(
        f"{path} is not writable ({why})",
        where=key,
        fix=f"set {key} to a folder you can write to, or make this one writable",
    )


def write_text(path: Path, text: str) -> None:
    """Write ``path`` atomically: a killed process leaves the old file or the new one, and a
    link planted at ``path`` (or at a guessable temporary name) is never written through."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def planted_links(root: Path) -> list[Path]:
    """Symbolic links inside the run folder ``root`` (not under ``checkpoints/``)."""
    found: list[Path] = []
    for top, dirs, files in os.walk(root):
        here = Path(top)
        if here == root:
            dirs[:] = [d for d in dirs if d not in _NOT_SCANNED]
        for name in [*dirs, *files]:
            if (here / name).is_symlink():
                found.append(here / name)
    return sorted(found)


def refuse_links(root: Path) -> None:
    """A ``RunError`` naming the links planted in the run folder ``root``, if any: lorakit
    never makes one, and reading or writing through one would reach outside the run."""
    links = planted_links(root)
    if not links:
        return
    shown = ", ".join(f"{p.relative_to(root)} -> {os.readlink(p)}" for p in links[:5])
    more = f" and {len(links) - 5} more" if len(links) > 5 else ""
    raise RunError(
        f"run folder {root} holds symbolic links lorakit did not make ({shown}{more}); "
        "nothing was read or written through them",
        fix="remove the links (copy real files in their place if you meant to), or use "
        "another run folder",
    )
