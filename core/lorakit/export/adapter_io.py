"""Save a trained adapter so stock PEFT and inference servers load it without surprises.

The folder holds the adapter weights (safetensors), the tokenizer with its chat template, a
``generation_config.json`` whose ``eos_token_id`` includes the template's end-of-turn token, and
``lorakit.json`` describing how it was trained (base model, formatter, end-of-turn).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lorakit.errors import RunError
from lorakit.rundir import read_json, write_json

META = "lorakit.json"


def stop_token_ids(tokenizer: Any, end_of_turn: str) -> list[int]:
    """End-of-turn first, then the tokenizer's eos when it differs."""
    ids = []
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    if isinstance(eot_id, int) and eot_id != tokenizer.unk_token_id:
        ids.append(eot_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def save_adapter(
    model: Any,
    tokenizer: Any,
    folder: Path,
    meta: dict[str, Any],
    end_of_turn: str,
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Write the adapter folder atomically and verify it is not empty.

    ``state_dict``: the model's weights gathered whole, when a sharding engine (FSDP) holds only
    a shard of each in this process; PEFT keeps the adapter's entries of it.

    Half-written folders a killed earlier save left behind (``.NAME.tmp-*``) are removed first:
    the caller owns ``folder`` (a run holds its folder's claim), so no other writer uses them.
    """
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    # a temp name of this process's own, so two writers never share one
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        _write_adapter(model, tokenizer, tmp, meta, end_of_turn, state_dict)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave half an adapter behind
        raise
    if folder.exists():
        old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
        os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)


def _write_adapter(
    model: Any,
    tokenizer: Any,
    tmp: Path,
    meta: dict[str, Any],
    end_of_turn: str,
    state_dict: dict[str, Any] | None,
) -> None:
    from safetensors import safe_open

    extra = {} if state_dict is None else {"state_dict": state_dict}
    model.save_pretrained(str(tmp), safe_serialization=True, **extra)
    from lorakit.lora_init import convert_to_plain_lora, initial_lora

    initial = initial_lora(model)
    if initial is not None:  # PiSSA/OLoRA: a plain LoRA delta against the original base
        convert_to_plain_lora(tmp, initial)
    tokenizer.save_pretrained(str(tmp))
    gen = model.generation_config if hasattr(model, "generation_config") else None
    if gen is not None:
        gen = gen.__class__.from_dict(gen.to_dict())
        gen.eos_token_id = stop_token_ids(tokenizer, end_of_turn)
        gen.pad_token_id = tokenizer.pad_token_id
        gen.save_pretrained(str(tmp))
    write_json(tmp / META, {**meta, "end_of_turn": end_of_turn})
    weights = tmp / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        names = list(f.keys())
        if not names:
            raise RunError(
                f"saving the adapter produced an empty {weights.name}", fix="report this bug"
            )
        broken = [k for k in names if not bool(f.get_tensor(k).isfinite().all())]
    if broken:  # what would be written is checked, however the weights got there
        raise RunError(
            f"the adapter holds NaN or Inf weights ({broken[0]}"
            + (f" and {len(broken) - 1} more" if len(broken) > 1 else "")
            + "); it was not saved",
            fix="the training diverged or a checkpoint is damaged: resume from an earlier "
            "checkpoint-N, or lower train.learning_rate",
        )


def read_meta(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / META
    return read_json(path) if path.is_file() else {}
