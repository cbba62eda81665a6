"""The files of a checkpoint read without torch: safetensors headers and values, and pickles.

``safetensors_problem`` validates a header completely (each entry's dtype, shape and offsets,
entries that tile the data exactly) and reads the float tensors' bits for NaN/Inf.
``pickle_problem`` runs Python's own unpickler with every global replaced by an inert stand-in:
the real pickle machine decides which globals the pickle names (no opcode guessing that pushes
and pops can fool), and nothing the pickle names is ever called.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

# bytes per element of each safetensors dtype
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# float dtypes: (unsigned view, exponent mask); all exponent bits set is Inf or NaN
_EXPONENT = {
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F32": ("<u4", 0x7F800000),
    "F64": ("<u8", 0x7FF0000000000000),
}


def safetensors_problem(path: Path, check_values: bool = False) -> str | None:
    """Why a safetensors file is not whole (or, with ``check_values``, holds NaN/Inf), or None."""
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return "missing or truncated header"
            n = int.from_bytes(raw, "little")
            if n > 100_000_000:
                return "header too large"
            header = json.loads(f.read(n))
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as exc:
        return f"unreadable header ({type(exc).__name__})"
    spans = _spans(header)
    if isinstance(spans, str):
        return f"bad header: {spans}"
    if not spans:
        return "holds no tensors"
    end = max(stop for _, stop, _, _ in spans)
    if size != 8 + n + end:
        return f"truncated ({size} bytes, the header describes {8 + n + end})"
    at = 0
    for start, stop, name, _ in sorted(spans):
        if start != at:
            how = "overlaps the tensor before it" if start < at else "leaves a gap before it"
            return f"bad header: {name}'s data_offsets [{start}, {stop}] {how}"
        at = stop
    if check_values:
        return _non_finite(path, 8 + n, spans)
    return None


def _spans(header: Any) -> list[tuple[int, int, str, str]] | str:
    """(start, stop, name, dtype) of each tensor, or what is wrong with the header."""
    if not isinstance(header, dict):
        return f"a JSON {type(header).__name__}, not an object"
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            return f"{name} is not an object"
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            return f"{name} has an unknown dtype {dtype!r}"
        if not (isinstance(shape, list) and all(_natural(d) for d in shape)):
            return f"{name} has no valid shape"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_natural, offsets))):
            return f"{name} has no valid data_offsets"
        start, stop = offsets
        count = 1
        for d in shape:
            count *= d
        if stop - start != count * DTYPE_SIZES[dtype]:
            return f"{name}: shape {shape} of {dtype} does not fill data_offsets [{start}, {stop}]"
        spans.append((start, stop, name, dtype))
    return spans


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _non_finite(path: Path, base: int, spans: list[tuple[int, int, str, str]]) -> str | None:
    import numpy as np

    with path.open("rb") as f:
        for start, stop, name, dtype in spans:
            if dtype not in _EXPONENT:
                continue
            view, mask = _EXPONENT[dtype]
            f.seek(base + start)
            bits = np.frombuffer(f.read(stop - start), dtype=view)
            if bool(((bits & np.array(mask, dtype=view)) == mask).any()):
                return f"{name} holds NaN or Inf values"
    return None


# What a checkpoint's pickles may name: tensors, storages, numpy arrays (the RNG states) and
# plain containers. Anything else (os.system, builtins.eval, ...) would run code when loaded.
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Size"),
    ("torch", "device"),
}


def _safe_global(module: str, name: str) -> bool:
    if (module, name) in _SAFE_GLOBALS:
        return True
    if module == "torch._utils" and name.startswith("_rebuild_"):
        return True
    if module == "numpy.dtypes" and name.endswith("DType"):
        return True
    if module == "torch":
        return bool(re.fullmatch(r"[A-Za-z0-9]*Storage|u?int\d+|float\d+|bfloat16|bool", name))
    return False


class _Inert:
    """Stands for every global a checkpoint pickle names: accepts any call, state or item."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _Refused(Exception):
    pass


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not _safe_global(module, name):
            raise _Refused(f"{module}.{name}")
        return _Inert

    def persistent_load(self, pid: Any) -> Any:
        return None  # a tensor's storage: torch keeps it in the zip, outside the pickle


def pickle_problem(path: Path) -> str | None:
    """Names a global in a torch zip file's pickle that is not a tensor/array building block.

    torch is not imported and nothing the pickle names is called: a checkpoint that names e.g.
    ``os.system`` was not written by a training run.
    """
    try:
        with zipfile.ZipFile(path) as z:
            blobs = [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
    except (OSError, zipfile.BadZipFile) as exc:
        return f"unreadable ({exc})"
    for blob in blobs:
        try:
            _InertUnpickler(io.BytesIO(blob)).load()
        except _Refused as exc:
            return f"its pickle names {exc}, which runs code when loaded"
        except RecursionError:
            return "its pickle is nested too deeply"
        except Exception as exc:  # any malformed pickle: refused, never loaded
            return f"its pickle is malformed ({type(exc).__name__}: {exc})"
    return None
