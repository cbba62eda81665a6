"""Disk full while writing: one clear error instead of a traceback from deep in torch.

Writes fail with ENOSPC (no space left), EDQUOT (quota) or EFBIG (file size limit), as an
``OSError`` from Python, a ``RuntimeError`` from ``torch.save`` or a ``SafetensorError``; all
are recognised here, also when chained as the cause of another exception.
"""

from __future__ import annotations

import contextlib
import errno
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from lorakit.errors import RunError

_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_WORDS = (
    "no space left",
    "disk quota exceeded",
    "file too large",
    "os error 28",
    "os error 27",
    "os error 122",
    "file write failed",  # torch's PytorchStreamWriter
    "unexpected pos",  # torch's zip writer after a short write it did not report
)


# numpy's ``tofile`` (the GGUF writer's tensors) reports a short write as an OSError with no
# errno: "8192 requested and 7440 written". A regular file is written short only when the disk
# or a file size limit stops it.
_SHORT_WRITE = re.compile(r"\b\d+ requested and \d+ written\b")


def is_disk_full(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in _ERRNOS:
            return True
        text = str(exc).lower()
        if any(w in text for w in _WORDS):
            return True
        if isinstance(exc, OSError) and _SHORT_WRITE.search(text):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


_RESUME = (
    "free some space (or write runs elsewhere with output.dir=...) and run the same command "
    "with --resume-from-checkpoint auto"
)


@contextlib.contextmanager
def disk_full_is_an_error(
    path: Path, what: str, kept: str | Callable[[], str], fix: str = _RESUME
) -> Iterator[None]:
    """Turn a disk-full failure inside the block into a ``RunError`` naming ``path`` and what
    is kept (``kept``: a sentence, or a function that writes it once the write failed), with
    ``fix`` (by default: free space and resume the run)."""
    try:
        yield
    except RunError:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise RunError(
            f"the disk is full (or a file size limit was hit) while writing {what} in {path}; "
            f"{kept if isinstance(kept, str) else kept()}",
            fix=fix,
        ) from exc
