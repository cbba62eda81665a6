"""``lora``: LoRA adapters (optionally DoRA or rank-stabilised LoRA) through peft.

``init`` picks how the adapter starts (docs/performance.md, LoRA inits): PEFT's default (A random,
B zero), ``gaussian``, or an init that puts something useful in the adapter before the first
step: ``pissa`` and ``olora`` (the weights' principal / QR part moves into the adapter and the
base keeps the residual: the base is rewritten, so the saved adapter is converted to a plain
LoRA delta against the original base; on a ``bnb-4bit`` base the decomposition is made on the
full-precision weights and only the residual is quantized: QPiSSA, ``lorakit.qpissa``), ``loftq`` (the adapter fitted to the 4-bit quantization
error; the base is untouched, unless ``loftq_iter`` > 1 alternates fit and quantization on the
fp32 weights and quantizes the residual) and ``eva`` (from activations on the run's own training rows).
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
from attrs import validators as v
from lorakit.api import RegisterPeftMethod, each_value, finite, hookimpl, option


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


def _at_least_one(_inst, _attr, value):
    # a rank or alpha in rank_pattern / alpha_pattern: the range r and alpha have
    if value < 1:
        raise ValueError(f"must be 1 or more (like r and alpha), got {value}")


@attrs.frozen
class LoraOptions:
    r: int = option(16, doc="adapter rank; higher: more capacity, more memory", validator=v.ge(1))
    alpha: int = option(
        32,
        doc="scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)",
        validator=v.ge(1),
    )
    dropout: float = option(
        0.05,
        doc="dropout on the adapter input during training",
        validator=[finite, v.ge(0.0), v.lt(1.0)],
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
    init: Literal["default", "gaussian", "pissa", "olora", "loftq", "eva"] = option(
        "default",
        doc="adapter init: default (A random, B zero), gaussian, pissa / olora (principal / QR "
        "part of each weight; rewrites the base; on bnb-4bit only the residual is quantized: "
        "QPiSSA), loftq (fits the 4-bit error; needs bnb-4bit), "
        "eva (from activations on the training rows)",
        recorded_when_set=True,
    )
    pissa_niter: int = option(
        0,
        doc="pissa: 0 for the exact SVD, N for a fast randomized SVD with N iterations "
        "(much faster on big layers, nearly the same init)",
        validator=v.ge(0),
        recorded_when_set=True,
    )
    loftq_iter: int = option(
        1,
        doc="loftq: alternations of 4-bit quantization and rank-r fit; 1: the base is left "
        "as loaded; more: the base holds the quantized residual of the fit (rewrites the base, "
        "like QPiSSA)",
        validator=v.ge(1),
        recorded_when_set=True,
    )
    eva_batches: int = option(
        8,
        doc="eva: training micro-batches whose activations set the init (more: steadier "
        "directions, slower start)",
        validator=v.ge(1),
        recorded_when_set=True,
    )
    lora_plus_ratio: float = option(
        0.0,
        doc="LoRA+: B's learning rate is this many times A's (the paper suggests 16); "
        "0: one learning rate",
        validator=[finite, v.ge(0.0)],
        recorded_when_set=True,
    )
    rank_pattern: dict[str, int] = option(
        factory=dict,
        doc='per-module rank overriding r, by name or regex: {"q_proj" = 32}',
        validator=each_value(_at_least_one),
        recorded_when_set=True,
    )
    alpha_pattern: dict[str, int] = option(
        factory=dict,
        doc='per-module alpha overriding alpha, by name or regex: {"q_proj" = 64}',
        validator=each_value(_at_least_one),
        recorded_when_set=True,
    )
    modules_to_save: list[str] = option(
        factory=list,
        doc='modules trained in full and saved with the adapter, e.g. ["lm_head", '
        '"embed_tokens"] after adding tokens (merge and export keep them)',
        recorded_when_set=True,
    )

    def __attrs_post_init__(self) -> None:
        if self.pissa_niter and self.init != "pissa":
            raise ValueError(
                f'pissa_niter = {self.pissa_niter} is only used with init = "pissa", not '
                f"{self.init!r}; remove it or set init"
            )
        if self.loftq_iter != 1 and self.init != "loftq":
            raise ValueError(
                f'loftq_iter = {self.loftq_iter} is only used with init = "loftq", not '
                f"{self.init!r}; remove it or set init"
            )
        if self.eva_batches != 8 and self.init != "eva":
            raise ValueError(
                f'eva_batches = {self.eva_batches} is only used with init = "eva", not '
                f"{self.init!r}; remove it or set init"
            )
        if 0.0 < self.lora_plus_ratio < 1.0:
            raise ValueError(
                f"lora_plus_ratio = {self.lora_plus_ratio}: LoRA+ trains B faster than A; "
                "use 0 (off) or a ratio of at least 1 (16 in the paper)"
            )
        if (
            (self.init in REWRITES_BASE or self.loftq_iter > 1)
            and self.use_rslora
            and (self.rank_pattern or self.alpha_pattern)
        ):
            # PEFT cannot convert such an adapter back to a plain LoRA on the original base
            raise ValueError(
                f"init = {self.init!r} with use_rslora and rank_pattern/alpha_pattern cannot be "
                "exported as a plain LoRA on the original base (PEFT refuses the conversion); "
                "drop use_rslora or the patterns"
            )

    def combination_problems(self, *, quantizes: bool, quant: str, objective: str) -> list[str]:
        """Problems of this init with the recipe's [quant] and [train] (``lorakit check``)."""
        problems = []
        if self.init == "loftq" and quant != "bnb-4bit":
            problems.append(
                f'[peft].init = "loftq" fits the adapter to the 4-bit quantization error, and '
                f'[quant].plugin = {quant!r} has none; use [quant] plugin = "bnb-4bit" or '
                "another init (pissa, olora on an unquantized base)"
            )
        if self.init in REWRITES_BASE and quantizes and quant != "bnb-4bit":
            problems.append(
                f"[peft].init = {self.init!r} with [quant].plugin = {quant!r}: lorakit takes "
                "the principal part from the full-precision weights and quantizes only the "
                'residual (QPiSSA) to 4 bit; use [quant] plugin = "bnb-4bit" or "none"'
            )
        if self.init == "eva" and objective != "sft":
            problems.append(
                f'[peft].init = "eva" reads activations of SFT training rows, and '
                f"[train].objective = {objective!r} trains on preference pairs; use another "
                "init, or set EVA up in the SFT run you start from (train.from_adapter)"
            )
        return problems


# inits after which the base holds a residual: the saved adapter is converted to a plain delta
REWRITES_BASE = ("pissa", "olora")


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
        init: bool | str = True
        extra: dict[str, Any] = {}
        if o.init == "pissa":
            init = f"pissa_niter_{o.pissa_niter}" if o.pissa_niter else "pissa"
        elif o.init == "loftq":
            init = True  # lorakit fits A and B after attaching (lorakit.lora_init)
        elif o.init == "eva":
            from peft import EvaConfig

            init = "eva"
            extra["eva_config"] = EvaConfig()
        elif o.init != "default":
            init = o.init
        return LoraConfig(
            init_lora_weights=init,  # type: ignore[arg-type]
            rank_pattern=dict(o.rank_pattern),
            alpha_pattern=dict(o.alpha_pattern),
            modules_to_save=list(o.modules_to_save) or None,
            **extra,
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
