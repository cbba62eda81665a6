"""``none``: load the base model unquantized in its compute dtype (plain LoRA)."""

from __future__ import annotations

from typing import Any, Literal

import attrs
from lorakit.api import DtypeName, RegisterQuantizer, dtype_from_name, hookimpl, option


@attrs.frozen
class NoQuantOptions:
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto",
        doc="weight dtype; auto: bf16 where measured fast (capable GPUs and CPUs), fp16 on "
        "older GPUs, else fp32",
    )


class NoQuant:
    Options = NoQuantOptions
    default = True  # what a recipe without [quant] plugin gets
    quantizes = False  # weights load in a plain dtype

    def __init__(self, options: NoQuantOptions):
        self.options = options

    def compute_dtype(self, device: str) -> Any:
        return dtype_from_name(self.options.dtype, device)

    @property
    def dtype_setting(self) -> tuple[str, str]:
        return "dtype", self.options.dtype

    def with_compute_dtype(self, name: DtypeName) -> NoQuant:
        return NoQuant(attrs.evolve(self.options, dtype=name))

    def load_kwargs(self, device: str) -> dict[str, Any]:
        return {"dtype": self.compute_dtype(device)}

    def memory_spec(self) -> dict[str, Any]:
        """For ``lorakit plan``: every weight in one dtype."""
        return {"weights": "none", "dtype": self.options.dtype}

    def prepare_for_training(self, model: Any, gradient_checkpointing: bool) -> Any:
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            # Frozen embeddings give checkpointed blocks inputs without grad; LoRA needs them.
            model.enable_input_require_grads()
        return model


@hookimpl
def lorakit_register_quantizers(register: RegisterQuantizer) -> None:
    register("none", NoQuant)
