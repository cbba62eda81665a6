"""Deterministic train/val/test splits.

An example's split depends only on its content and the split seed: adding examples never moves
an existing one. Identical conversations share a key, so they always land in the same split
(no leakage between train and eval). ``meta.split`` wins when present.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

from lorakit.contracts import SPLITS, Example
from lorakit.errors import DataError

__all__ = ["SPLITS", "assign_splits", "content_key", "fingerprint", "hashed_split"]


def content_key(example: Example) -> str:
    """A fingerprint of what the model sees (not the id, not the meta)."""
    body = example.to_json()
    blob = json.dumps({"messages": body.get("messages"), "text": body.get("text")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _unit(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hashed_split(key: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    u = _unit(seed, key)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def assign_splits(
    examples: Sequence[Example], seed: int, val_fraction: float, test_fraction: float
) -> dict[str, list[Example]]:
    """Split ``examples`` into train/val/test, keeping input order within each split."""
    pinned: dict[str, tuple[str, str]] = {}  # content key -> (split, example id that pinned it)
    keys = [content_key(ex) for ex in examples]
    for ex, key in zip(examples, keys, strict=True):
        want = ex.meta.get("split")
        if want is None:
            continue
        if key in pinned and pinned[key][0] != want:
            raise DataError(
                f"examples {pinned[key][1]} and {ex.id} are identical but meta.split puts them in "
                f"{pinned[key][0]} and {want}",
                where=str(ex.meta.get("source", ex.id)),
                fix="drop the duplicate or give both the same split (identical data in train and "
                "eval inflates scores)",
            )
        pinned[key] = (want, ex.id)
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for ex, key in zip(examples, keys, strict=True):
        split = (
            pinned[key][0]
            if key in pinned
            else hashed_split(key, seed, val_fraction, test_fraction)
        )
        out[split].append(ex)
    return out


def fingerprint(examples: Iterable[Example]) -> str:
    """A short hash of a list of examples (order-sensitive), for reports and model cards."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(ex.to_json(), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]
