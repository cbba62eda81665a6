"""Deterministic train/val/test splits.

An example's split depends only on its content and the split seed: adding examples never moves
an existing one. Identical conversations share a key, so they always land in the same split
(no leakage between train and eval). ``meta.split`` wins when present.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence

from lorakit.contracts import SPLITS, Example
from lorakit.errors import DataError

__all__ = [
    "SPLITS",
    "SplitAssigner",
    "assign_splits",
    "content_key",
    "fingerprint",
    "hashed_split",
]


def content_key(example: Example) -> str:
    """A fingerprint of what the model sees (not the id, not the meta)."""
    body = example.to_json()
    seen = {"messages": body.get("messages"), "text": body.get("text")}
    if "rejected" in body:  # a pair: the same chosen side with another rejected one differs
        seen["rejected"] = body["rejected"]
    if "label" in body:  # an unpaired answer: the same answer labelled the other way differs
        seen["label"] = body["label"]
    if "tools" in body:  # only when set, so the keys (and splits) of tool-less data never move
        seen["tools"] = body["tools"]
    blob = json.dumps(seen, sort_keys=True)
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


class SplitAssigner:
    """:func:`assign_splits` one example at a time, for data sets that do not fit in memory.

    ``add`` returns the example's split as far as is known then (its ``meta.split``, else its
    hashed split); ``finish`` returns the examples whose split changed because an identical
    example later pinned their content with ``meta.split`` (index -> split), and raises the
    error ``assign_splits`` raises when identical examples are pinned to different splits.
    The result is the same as ``assign_splits`` on the whole list. Memory: 16 bytes of content
    key per example, plus a table entry per pinned content.
    """

    def __init__(self, seed: int, val_fraction: float, test_fraction: float) -> None:
        self.seed, self.val_fraction, self.test_fraction = seed, val_fraction, test_fraction
        self.keys = bytearray()  # the first 16 bytes of each example's content key
        self.pinned_any = bytearray()  # 1 where the example has its own meta.split
        self.pinned: dict[bytes, tuple[str, int]] = {}  # key -> (split, last example pinning it)
        self.conflict: tuple[int, int, str, str] | None = None  # (earlier, later, their splits)

    def add(self, example: Example) -> str:
        key = content_key(example)
        short = bytes.fromhex(key[:32])
        index = len(self.pinned_any)
        self.keys += short
        want = example.meta.get("split")
        self.pinned_any.append(want is not None)
        if want is None:
            return hashed_split(key, self.seed, self.val_fraction, self.test_fraction)
        earlier = self.pinned.get(short)
        if earlier is not None and earlier[0] != want and self.conflict is None:
            self.conflict = (earlier[1], index, earlier[0], want)
        self.pinned[short] = (want, index)
        return str(want)

    def finish(
        self, provisional: Callable[[int], str], example_at: Callable[[int], Example]
    ) -> dict[int, str]:
        """``provisional(i)``: what ``add`` returned for example ``i``; ``example_at(i)``
        reads example ``i`` back (only for the error message)."""
        if self.conflict is not None:
            first, later, was, want = self.conflict
            a, b = example_at(first), example_at(later)
            raise DataError(
                f"examples {a.id} and {b.id} are identical but meta.split puts them in "
                f"{was} and {want}",
                where=str(b.meta.get("source", b.id)),
                fix="drop the duplicate or give both the same split (identical data in train and "
                "eval inflates scores)",
            )
        moved: dict[int, str] = {}
        if not self.pinned:
            return moved
        for i, own in enumerate(self.pinned_any):
            if own:
                continue
            pin = self.pinned.get(bytes(self.keys[16 * i : 16 * i + 16]))
            if pin is not None and pin[0] != provisional(i):
                moved[i] = pin[0]
        return moved


def fingerprint(examples: Iterable[Example]) -> str:
    """A short hash of a list of examples (order-sensitive), for reports and model cards."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(ex.to_json(), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]
