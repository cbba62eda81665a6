"""What ``lorakit export`` checks and fixes around the files it writes.

- ``run_at_rest``: a run folder claimed by a live ``lorakit run`` (training, evaluating, saving)
  is refused; the claim is held shared while exporting, so no run starts in the folder meanwhile.
- ``follow_umask``: the export is built in a ``mkdtemp`` folder (mode 0700) from files some of
  which are written 0600 or 0644 whatever the umask; before it is published every folder and
  file gets the mode a plain ``mkdir``/``open`` would give, so a daemon running as another user
  (Ollama, llama-server) can read what the user's umask lets it read.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from lorakit.errors import RunError


@contextlib.contextmanager
def run_at_rest(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s claim shared for the export; raise ``RunError`` if a running lorakit
    process holds it (``lorakit run`` holds it exclusively for the life of the run)."""
    import fcntl

    claim = Path(run_dir) / ".lorakit-claim"
    try:
        fd = os.open(claim, os.O_RDONLY | os.O_NOFOLLOW)
    # never claimed (a copied folder), or not a folder at all (a recipe file: refused by name
    # once the claim is known to be free): nothing runs there
    except (FileNotFoundError, NotADirectoryError):
        yield
        return
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise RunError(
            f"{claim} is a symbolic link, not a claim lorakit wrote; nothing was exported",
            fix="remove the link (it is not lorakit's) and export again",
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            owner = os.read(fd, 64).decode("utf-8", "replace").strip()
            raise RunError(
                f"run folder {run_dir} is in use by a running lorakit process"
                + (f" (pid {owner})" if owner.isdigit() else "")
                + ": it is still training, evaluating or saving, and its adapter may be "
                "replaced under the export; nothing was exported",
                fix="wait for it to finish (`lorakit run` prints `done:`), then export again",
            ) from None
        yield
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Give ``root`` and everything under it the mode ``mkdir``/``open`` give under the
    current umask (folders 0777, files 0666, minus the umask). Links are left alone."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
