"""Read a whole text file (markdown, JSON) with errors that name the file and line."""

from __future__ import annotations

from pathlib import Path

from lorakit.contracts import SourceContext
from lorakit.data.jsonl import GZIP_MAGIC

MAX_FILE_BYTES = 64 * 1024 * 1024


def line_of(data: bytes | str, offset: int) -> int:
    """1-based line number of ``offset`` in ``data``."""
    nl = b"\n" if isinstance(data, bytes) else "\n"
    return data.count(nl, 0, offset) + 1  # type: ignore[arg-type]


def read_text_file(path: Path, ctx: SourceContext, what: str) -> str | None:
    """The file's text, or None when it was rejected (and skipped) for a reason ctx records.

    Rejects gzip bytes, files over ``MAX_FILE_BYTES``, non-UTF-8 bytes (with line and column) and
    empty files. A UTF-8 byte-order mark is dropped; line endings are kept as they are.
    """
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        ctx.reject(
            f"file is {size / 1e6:.0f} MB, over the {MAX_FILE_BYTES // 2**20} MiB limit for one {what}",
            str(path),
            "split it into smaller files",
        )
        return None
    data = path.read_bytes()
    if data.startswith(GZIP_MAGIC):
        ctx.reject(
            "file is gzip-compressed, not plain text",
            str(path),
            f"decompress it first: gunzip -c {path.name} > {path.stem}.plain{path.suffix}",
        )
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = line_of(data, exc.start)
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        ctx.reject(
            f"not UTF-8 (byte 0x{data[exc.start]:02x} at column {col})",
            f"{path}:{line}",
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
        )
        return None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        ctx.reject(f"{what} file is empty", str(path), "add content, or exclude the file")
        return None
    return text
