"""Helpers of the ``hf_dataset`` source: which files a path holds and how datasets reads them,
rows' values as JSON data, a fast check that the Hub is reachable, datasets' errors in one line.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorakit.api import DataError, resolve_path

BUILDERS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
}
KEY = "[data.sources]"


NOT_JSON = object()


def jsonable(value: Any) -> Any:
    """Plain JSON data, dates as ISO strings; ``NOT_JSON`` for anything else (bytes, images)."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else NOT_JSON
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        items = [jsonable(x) for x in value]
        return NOT_JSON if any(x is NOT_JSON for x in items) else items
    if isinstance(value, Mapping):
        out = {str(k): jsonable(x) for k, x in value.items()}
        return NOT_JSON if any(x is NOT_JSON for x in out.values()) else out
    return NOT_JSON


def suffix_of(path: Path) -> str:
    return path.suffix.lower()


def saved_to_disk(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()


def files_in(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and suffix_of(p) in BUILDERS)


def glob_files(recipe_dir: Path, pattern: str) -> list[Path]:
    base = resolve_path(recipe_dir, pattern)
    if base.is_file():
        return [base]
    anchor = Path(base.anchor)
    return [p for p in anchor.glob(str(base.relative_to(anchor))) if p.is_file()]


def hub_unreachable() -> str:
    """Why the Hub cannot be reached ("" when it can): one TCP connect, 3 s at most, instead
    of datasets' minute of retries."""
    import socket
    from urllib.parse import urlsplit

    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=3):
            return ""
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"


def read_failed(label: str, exc: Exception) -> DataError:
    text = str(exc).strip().splitlines()
    cause = exc.__cause__ or exc.__context__
    detail = text[0] if text else ""
    if cause is not None and str(cause).strip():
        detail = f"{detail} ({type(cause).__name__}: {str(cause).strip().splitlines()[0]})"
    hint = "check the files (one kind per source, well-formed), the split name and config"
    if "split" in detail.lower():
        hint = "set split to one the dataset has (see the message)"
    elif "config" in detail.lower():
        hint = "set config to one the dataset has (see the message)"
    return DataError(
        f"datasets could not read {label}: {type(exc).__name__}: {detail}"[:2000],
        where=KEY,
        fix=hint,
    )
