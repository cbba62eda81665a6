"""Checkpoint folders: are they whole, which step they hold, and loading one's adapter.

``checkpoint_problem`` reads only JSON, safetensors headers and zip checksums: no torch import
and nothing unpickled, so ``--resume-from-checkpoint auto`` can skip a damaged checkpoint before
anything loads it.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

CHECKPOINT_PICKLES = ("optimizer.pt", "scheduler.pt", "rng_state.pth")
# under FSDP with FULL_STATE_DICT accelerate writes the gathered optimizer state here instead
FSDP_OPTIMIZER = "optimizer.bin"


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (truncated or unreadable files), or None.

    Reads only headers, JSON and zip checksums: no torch import, no unpickling.
    """
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"trainer_state.json is unreadable ({type(exc).__name__})"
    weights = folder / "adapter_model.safetensors"
    problem = safetensors_problem(weights)
    if problem:
        return f"{weights.name}: {problem}"
    for name in CHECKPOINT_PICKLES:
        path = folder / name
        if name == "optimizer.pt" and not path.is_file() and (folder / FSDP_OPTIMIZER).is_file():
            name, path = FSDP_OPTIMIZER, folder / FSDP_OPTIMIZER
        if not path.is_file():
            if name == "rng_state.pth":
                continue  # torch writes it per process; a missing one only loses the RNG
            return f"{name} is missing"
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile) as exc:
            return f"{name} is truncated or not a torch file ({exc})"
        if bad is not None:
            return f"{name}: {bad} fails its checksum"
        foreign = pickle_problem(path)
        if foreign is not None:
            return f"{name} is refused: {foreign}"
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
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING"}
_STRING_OPS |= {"SHORT_BINSTRING", "BINSTRING"}


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


def pickle_problem(path: Path) -> str | None:
    """Names a global in a torch zip file's pickle that is not a tensor/array building block.

    Read with :mod:`pickletools` (nothing is unpickled, torch is not imported): a checkpoint
    that names e.g. ``os.system`` was not written by a training run.
    """
    import pickletools

    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(".pkl")]
            blobs = [z.read(n) for n in names]
    except (OSError, zipfile.BadZipFile) as exc:
        return f"unreadable ({exc})"
    for blob in blobs:
        strings: list[str] = []
        memo: dict[int, str] = {}
        try:
            for op, arg, _ in pickletools.genops(blob):
                if op.name in _STRING_OPS:
                    strings.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                    memo[int(arg or 0)] = strings[-1]
                elif op.name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ("BINGET", "LONG_BINGET", "GET") and int(arg or 0) in memo:
                    strings.append(memo[int(arg or 0)])
                elif op.name in ("GLOBAL", "INST"):
                    module, _, name = str(arg).partition(" ")
                    if not _safe_global(module, name):
                        return f"its pickle names {module}.{name}, which runs code when loaded"
                elif op.name == "STACK_GLOBAL":
                    module, name = strings[-2:] if len(strings) >= 2 else ("?", "?")
                    if not _safe_global(module, name):
                        return f"its pickle names {module}.{name}, which runs code when loaded"
        except (ValueError, IndexError) as exc:
            return f"its pickle is malformed ({exc})"
    return None


def safetensors_problem(path: Path) -> str | None:
    """A safetensors file is whole when its header parses and the data ends where it says."""
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
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if not ends:
        return "holds no tensors"
    if size != 8 + n + max(ends):
        return f"truncated ({size} bytes, the header describes {8 + n + max(ends)})"
    return None


def checkpoint_step(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])


def load_checkpoint_adapter(model: Any, checkpoint: Path) -> None:
    """Put a checkpoint's adapter weights into ``model`` (a PEFT model), without training."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result: Any = set_peft_model_state_dict(
        model, load_file(str(checkpoint / "adapter_model.safetensors"))
    )
    bad = [k for k in (*result.missing_keys, *result.unexpected_keys) if "lora_" in k]
    if bad:
        from lorakit.errors import RunError

        raise RunError(
            f"{checkpoint}: its adapter does not fit this model ({bad[0]} ...)",
            fix="resume with the recipe the run was trained with",
        )
