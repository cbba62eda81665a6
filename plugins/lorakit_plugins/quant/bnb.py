"""``bnb-4bit`` and ``bnb-8bit``: bitsandbytes quantization of the frozen base (QLoRA).

bitsandbytes runs 4-bit NF4/FP4 on CPU too, so QLoRA is tested here for real. The compute dtype
``auto`` is bf16 where the hardware runs it fast (GPUs that support it; CPUs where a timed bf16
matmul beats fp32, see ``lorakit.device``), fp16 on older GPUs, else fp32. The base is
prepared with ``prepare_model_for_kbit_training`` *before* the adapter is attached (the other
order upcasts or freezes the wrong weights), with non-reentrant gradient checkpointing so
gradients reach the LoRA weights (peft#1142) and DDP stays happy.

On CPUs with AVX512-BF16, bitsandbytes (seen with 0.50) converts a ``Linear4bit`` layer's weights,
in place and for good, to a packed inference layout the first time it runs in eval mode without
gradients. From then on that layer computes in bf16 (absmax rounded to bf16) whatever the compute
dtype, and its matmul has no autograd formula: gradients no longer flow back through it. Left
alone, one mid-training evaluation (``eval_steps``) silently spoils the rest of a QLoRA run, and a
model scored, merged or exported after training is not quite the function that was trained.
``_pin_4bit_layers`` turns that conversion off in every load path (:meth:`Bnb4bit.finish_loading`
runs for every quantized load: training, evaluation, generation, export), whatever the compute
dtype, so every 4-bit model lorakit holds computes the function it trains.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
from attrs import validators as v
from lorakit.api import DtypeName, RegisterQuantizer, dtype_from_name, finite, hookimpl, option


def _pin_4bit_layers(model: Any) -> None:
    """Keep every 4-bit layer on the differentiable, compute-dtype path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        quant_state = getattr(module.weight, "quant_state", None)
        if getattr(quant_state, "packing_format_for_cpu", False):
            # Already converted (and rounded): only reloading the weights gives them back.
            raise RuntimeError(
                "a 4-bit layer was already converted to bitsandbytes' CPU inference layout; "
                "load the model again before training it"
            )
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def _unquantized_dtype() -> Any:
    """The dtype of the weights bitsandbytes leaves unquantized (embeddings, norms, the head).

    fp32, in every load: peft's ``prepare_model_for_kbit_training`` casts them to fp32 for
    training, so a model loaded with them in bf16 for evaluation, generation or export would be
    another function than the one trained (embeddings and norms rounded to bf16, among others).
    The quantized layers' matmuls run in the compute dtype; on a CPU whose compute dtype is
    bf16, so do attention's and the loss's head matmul (``lorakit.attention.matmul_dtype``,
    ``lorakit.fused_head.head_matmul_dtype``), from these fp32 weights and activations.
    Generation computes attention and the head in fp32 from the same weights: the trained
    function up to bf16 rounding.
    """
    import torch

    return torch.float32


def _prepare(model: Any, gradient_checkpointing: bool) -> Any:
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


@attrs.frozen
class Bnb4bitOptions:
    quant_type: Literal["nf4", "fp4"] = option(
        "nf4", doc="4-bit data type; nf4 suits normally distributed weights"
    )
    double_quant: bool = option(
        True, doc="quantize the quantization constants too (~0.4 bit/param saved)"
    )
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto",
        doc="dtype matmuls run in; auto: bf16 where measured fast (capable GPUs and CPUs), "
        "fp16 on older GPUs, else fp32",
    )


class Bnb4bit:
    Options = Bnb4bitOptions
    quantizes = True

    def __init__(self, options: Bnb4bitOptions):
        self.options = options

    def compute_dtype(self, device: str) -> Any:
        return dtype_from_name(self.options.compute_dtype, device)

    def load_kwargs(self, device: str) -> dict[str, Any]:
        from transformers import BitsAndBytesConfig

        dtype = self.compute_dtype(device)
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.options.quant_type,
            bnb_4bit_use_double_quant=self.options.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if device == "cuda" else None,
        )
        return {"quantization_config": config, "dtype": _unquantized_dtype()}

    @property
    def dtype_setting(self) -> tuple[str, str]:
        return "compute_dtype", self.options.compute_dtype

    def with_compute_dtype(self, name: DtypeName) -> Bnb4bit:
        return Bnb4bit(attrs.evolve(self.options, compute_dtype=name))

    def memory_spec(self) -> dict[str, Any]:
        """For ``lorakit plan``: how the base weights are stored, without loading anything."""
        o = self.options
        return {"weights": o.quant_type, "double_quant": o.double_quant, "dtype": o.compute_dtype}

    def finish_loading(self, model: Any, device: str) -> Any:
        # every load: a repacked layer would make eval, generate and export score another model
        _pin_4bit_layers(model)
        return model

    def prepare_for_training(self, model: Any, gradient_checkpointing: bool) -> Any:
        _pin_4bit_layers(model)  # whatever the dtype: the packed path has no backward
        return _prepare(model, gradient_checkpointing)


@attrs.frozen
class Bnb8bitOptions:
    threshold: float = option(
        6.0,
        doc="LLM.int8() outlier threshold (0: no outlier decomposition)",
        validator=[finite, v.ge(0.0)],
    )
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto",
        doc="dtype of the non-quantized parts; auto: bf16 where measured fast, else fp32 (CPU) "
        "or fp16 (older GPUs)",
    )


class Bnb8bit:
    Options = Bnb8bitOptions
    quantizes = True

    def __init__(self, options: Bnb8bitOptions):
        self.options = options

    def compute_dtype(self, device: str) -> Any:
        return dtype_from_name(self.options.compute_dtype, device)

    def load_kwargs(self, device: str) -> dict[str, Any]:
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=self.options.threshold)
        return {"quantization_config": config, "dtype": _unquantized_dtype()}

    @property
    def dtype_setting(self) -> tuple[str, str]:
        return "compute_dtype", self.options.compute_dtype

    def with_compute_dtype(self, name: DtypeName) -> Bnb8bit:
        return Bnb8bit(attrs.evolve(self.options, compute_dtype=name))

    def memory_spec(self) -> dict[str, Any]:
        """For ``lorakit plan``: int8 linear weights, the rest in the compute dtype."""
        return {"weights": "int8", "dtype": self.options.compute_dtype}

    def prepare_for_training(self, model: Any, gradient_checkpointing: bool) -> Any:
        return _prepare(model, gradient_checkpointing)


@hookimpl
def lorakit_register_quantizers(register: RegisterQuantizer) -> None:
    register("bnb-4bit", Bnb4bit)
    register("bnb-8bit", Bnb8bit)
