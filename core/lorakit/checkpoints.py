"""Checkpoint folders: are they whole, which step and run they hold, and loading one's adapter.

``checkpoint_problem`` reads JSON, the adapter's safetensors (header and float bits), zip
checksums and pickles through an unpickler that calls nothing: no torch import, so
``--resume-from-checkpoint auto`` can skip a damaged checkpoint before anything loads it.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from lorakit.checkpoint_files import pickle_problem, safetensors_problem

__all__ = ["checkpoint_problem", "checkpoint_step", "pickle_problem", "safetensors_problem"]

CHECKPOINT_PICKLES = ("optimizer.pt", "scheduler.pt", "rng_state.pth")
# under FSDP with FULL_STATE_DICT accelerate writes the gathered optimizer state here instead
FSDP_OPTIMIZER = "optimizer.bin"
MARKER = "LORAKIT_COMPLETE"  # written last; names the step and the run


def checkpoint_problem(folder: Path, run_id: str | None = None) -> str | None:
    """Why a checkpoint cannot be resumed from, or None: unreadable or truncated files, a step
    that is not its folder's, NaN/Inf adapter weights, a pickle that names code, or (given the
    run's ``run_id``) a marker written by another run.
    """
    problem = _state_problem(folder)
    if problem:
        return problem
    if run_id is not None:
        owner = marker_run_id(folder)
        if owner != run_id:
            return f"it was written by another run ({owner or 'no run id in its marker'})"
    weights = folder / "adapter_model.safetensors"
    problem = safetensors_problem(weights, check_values=True)
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


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _state_problem(folder: Path) -> str | None:
    """trainer_state.json parses (strict JSON) and its global_step is the folder's N."""
    try:
        text = (folder / "trainer_state.json").read_text(encoding="utf-8")
        state = json.loads(text, parse_constant=_refuse_constant)
        step = state["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"trainer_state.json is unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"trainer_state.json: global_step {step!r} is not a step number"
    named = folder.name.rpartition("-")[2]
    if named.isdigit() and int(named) != step:
        return f"trainer_state.json: global_step {step} is not the folder's step {named}"
    return None


def marker_run_id(folder: Path) -> str | None:
    """The run id a checkpoint's completeness marker names (``run <id>``), or None."""
    try:
        lines = (folder / MARKER).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    return next((ln.split(None, 1)[1] for ln in lines if ln.startswith("run ")), None)


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
