"""``lora``: LoRA adapters (optionally DoRA or rank-stabilised LoRA) through peft."""

from __future__ import annotations

from typing import Any, Literal

import attrs
from attrs import validators as v
from lorakit.api import RegisterPeftMethod, hookimpl, option


def _targets(_inst, _attr, value):
    if isinstance(value, str):
        if value != "all-linear":
            raise ValueError(
                f'"{value}": use "all-linear" or a list of module names like ["q_proj", "v_proj"]'
            )
    elif not value:
        raise ValueError(
            'the list is empty; name modules like ["q_proj", "v_proj"] or use "all-linear"'
        )


@attrs.frozen
class LoraOptions:
    r: int = option(16, doc="adapter rank; higher: more capacity, more memory", validator=v.ge(1))
    alpha: int = option(
        32,
        doc="scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)",
        validator=v.ge(1),
    )
    dropout: float = option(
        0.05, doc="dropout on the adapter input during training", validator=[v.ge(0.0), v.lt(1.0)]
    )
    target_modules: str | list[str] = option(
        "all-linear",
        doc='modules to adapt: "all-linear" or a list like ["q_proj", "v_proj"]',
        validator=_targets,
    )
    use_dora: bool = option(
        False, doc="weight-decomposed LoRA (DoRA): better quality, slower steps"
    )
    use_rslora: bool = option(False, doc="rank-stabilised scaling alpha/sqrt(r): helps at high r")
    bias: Literal["none", "all", "lora_only"] = option("none", doc="which biases to train")


class Lora:
    Options = LoraOptions
    default = True  # what a recipe without [peft] plugin gets

    def __init__(self, options: LoraOptions):
        self.options = options

    def memory_spec(self) -> dict[str, Any]:
        """For ``lorakit plan``: what decides the adapter's size."""
        o = self.options
        return {"r": o.r, "targets": o.target_modules, "dora": o.use_dora}

    def peft_config(self) -> Any:
        from peft import LoraConfig

        o = self.options
        targets = o.target_modules if isinstance(o.target_modules, str) else list(o.target_modules)
        return LoraConfig(
            r=o.r,
            lora_alpha=o.alpha,
            lora_dropout=o.dropout,
            target_modules=targets,
            use_dora=o.use_dora,
            use_rslora=o.use_rslora,
            bias=o.bias,
            task_type="CAUSAL_LM",
        )


@hookimpl
def lorakit_register_peft_methods(register: RegisterPeftMethod) -> None:
    register("lora", Lora)
