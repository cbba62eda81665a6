"""Checkpoint folders: are they whole, which step they hold, and loading one's adapter.

``checkpoint_problem`` reads only JSON, safetensors headers and zip checksums: no torch import
and nothing unpickled, so ``--resume-from-checkpoint auto`` can skip a damaged checkpoint before
anything loads it.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

CHECKPOINT_PICKLES = ("optimizer.pt", "scheduler.pt", "rng_state.pth")


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
