"""What each rank really trained on, for tests and diagnosis: set ``LORAKIT_TRACE_DIR``.

Each rank then writes, into that folder (never into the run folder):

- ``rank<R>.json``: every micro-batch it passed through the loss, as the indices of the rows of
  the tokenized training split, with its optimizer step and epoch;
- ``rank<R>-step1.safetensors`` and ``rank<R>-final.safetensors``: its LoRA weights after the
  first optimizer step and at the end of training.

The indices are taken from the batch that reaches ``compute_loss``, so they are what was trained
on, after the launcher's sharding and the sampler's padding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

ENV = "LORAKIT_TRACE_DIR"


def lora_weights(model: Any) -> dict[str, Any]:
    return {
        name: p.detach().to("cpu", copy=True).contiguous()
        for name, p in model.named_parameters()
        if "lora_" in name
    }


class RankTrace(TrainerCallback):
    def __init__(self, folder: Path) -> None:
        from lorakit.distributed import rank, world_size

        self.folder = folder
        self.rank = rank()
        self.world_size = world_size()
        self.epoch = -1
        self.step = 0
        self.batches: list[dict[str, Any]] = []

    @classmethod
    def from_env(cls) -> RankTrace | None:
        folder = os.environ.get(ENV)
        if not folder:
            return None
        Path(folder).mkdir(parents=True, exist_ok=True)
        return cls(Path(folder))

    def record(self, rows: list[int]) -> None:
        self.batches.append({"step": self.step + 1, "epoch": self.epoch, "rows": rows})

    def _save(self, model: Any, tag: str) -> None:
        from safetensors.torch import save_file

        save_file(lora_weights(model), str(self.folder / f"rank{self.rank}-{tag}.safetensors"))

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step  # a resumed run's next batch belongs to the step after

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch += 1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.step = state.global_step
        if state.global_step == 1 and model is not None:
            self._save(model, "step1")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._save(model, "final")
        info = {"rank": self.rank, "world_size": self.world_size, "batches": self.batches}
        (self.folder / f"rank{self.rank}.json").write_text(json.dumps(info), encoding="utf-8")
