"""An accelerate launch config against a recipe: what matters for LoRA/QLoRA under FSDP/DeepSpeed.

Called by :func:`lorakit.launch_config.check_launch_config`. Each rule below comes
from what the installed libraries do, named in the message:

* accelerate turns FSDP and DeepSpeed on only for GPU-type distributed modes: on CPU the ranks
  would train plain DDP (:func:`lorakit.distributed.check_engine` refuses that at start);
* the bnb-4bit plugin stores 4-bit weights in the compute dtype on CUDA
  (``bnb_4bit_quant_storage``) so that FSDP can shard them; FSDP's mixed precision casts every
  floating-point parameter to its ``param_dtype`` (bf16 for mixed_precision bf16 and fp8, fp16
  for fp16), so a different dtype would reinterpret the packed 4-bit bytes: garbage weights;
* 8-bit bitsandbytes weights have no such storage option;
* lorakit's checkpoints and adapter are ``adapter_model.safetensors`` files: the Trainer writes
  them under FSDP only with ``FULL_STATE_DICT``;
* transformers refuses FSDP's activation checkpointing together with the Trainer's own
  (``[train].gradient_checkpointing``), after the base model is loaded;
* transformers refuses a DeepSpeed accumulation or clipping that differs from the Trainer's.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from lorakit import accelerate_keys as keys

CPU_FIX = (
    'train on GPUs ([train].device = "auto" or "cuda"); on CPU launch without this config: '
    "lorakit run RECIPE --nproc N (DDP over gloo), see docs/distributed.md"
)

PARAM_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp8": "bf16"}  # accelerate's FSDP mapping


def check_against_recipe(
    report: Any,
    data: dict[str, Any],
    fsdp: dict[str, Any],
    deepspeed: dict[str, Any],
    recipe: Any,
    components: Any,
) -> None:
    engine = str(data.get("distributed_type", ""))
    weights, dtype, dtype_key = _base(recipe, components)
    _mixed_precision(report, data, engine, weights, dtype, dtype_key)
    if engine == "FSDP":
        _fsdp(report, fsdp, recipe, weights)
    if engine == "DEEPSPEED":
        _deepspeed(report, deepspeed, recipe)


def check_gpu_engine(report: Any, data: dict, engine: str, recipe: Any) -> None:
    why = (
        f"accelerate enables {engine} only on GPUs: on CPU the ranks would train plain DDP, "
        "every rank holding the whole model"
    )
    if data.get("use_cpu") is True:
        report.problem(
            "use_cpu",
            f"true with distributed_type {data['distributed_type']}: {why}",
            "set use_cpu: false, or " + CPU_FIX,
        )
    device = recipe.train.device if recipe is not None else "auto"
    if device in ("cpu", "mps"):
        report.problem(
            "distributed_type",
            f'{engine} with [train].device = "{device}" in '
            f"the recipe: {why} (lorakit refuses it when the run starts)",
            CPU_FIX,
        )
    elif device == "auto":
        said = '[train].device is "auto": ' if recipe is not None else ""
        report.note(
            f"{said}{engine} runs only on a machine with GPUs; on one without, lorakit "
            "stops at start instead of training plain DDP"
        )
    if engine == "DeepSpeed" and importlib.util.find_spec("deepspeed") is None:
        report.problem(
            "distributed_type",
            "DEEPSPEED, but the deepspeed package is not installed here "
            "(accelerate would fail in every rank at start)",
            "pip install deepspeed on the GPU machines (it builds CUDA kernels) and run this check "
            "there, or use FSDP: configs/accelerate_fsdp_lora.yaml",
        )


def _base(recipe: Any, components: Any) -> tuple[str, str, str]:
    """How the base weights are stored ("nf4", "int8", "none", ...), their dtype and its key."""
    from lorakit.contracts import ComputeDtypeSwitch, DescribesMemory

    quant: Any = components.quant if components is not None else None
    spec = quant.memory_spec() if isinstance(quant, DescribesMemory) else {}
    weights = spec.get("weights") or ("?" if quant is not None and quant.quantizes else "none")
    if isinstance(quant, ComputeDtypeSwitch):
        key, value = quant.dtype_setting
        return weights, value, f"[quant].{key}"
    return weights, str(spec.get("dtype", "auto")), "[quant]"


def _mixed_precision(
    report: Any, data: dict, engine: str, weights: str, dtype: str, dtype_key: str
) -> None:
    mp = data.get("mixed_precision") or "no"
    if mp not in PARAM_DTYPE:
        return  # "no", or a bad value already reported
    param = PARAM_DTYPE[mp]
    quantized = weights != "none"
    sharded_4bit = engine == "FSDP" and weights in ("nf4", "fp4")
    if quantized and mp == "fp8":
        report.problem(
            "mixed_precision",
            "fp8 with a quantized base: fp8 training swaps linear layers for fp8 ones, and "
            "bitsandbytes' quantized layers are linear layers holding packed weights",
            "use mixed_precision: 'no' (lorakit computes in the recipe's compute dtype)",
        )
    elif dtype == param:
        return
    elif dtype == "auto" and param == "bf16":
        report.note(
            f'mixed_precision {mp} with {dtype_key} = "auto": auto is bf16 on GPUs that '
            "have it; on older GPUs lorakit trains fp16 and that wins over this setting"
        )
    elif sharded_4bit:
        shown = "bf16 on GPUs that have it" if dtype == "auto" else dtype
        report.problem(
            "mixed_precision",
            f"{mp} casts every parameter to {param} under FSDP, but the bnb-4bit plugin stores "
            f"the 4-bit weights as {shown} bytes ({dtype_key}, bnb_4bit_quant_storage): the cast "
            "would turn them into garbage",
            f"set mixed_precision: 'no' (lorakit already computes in {dtype_key}), or make "
            f'{dtype_key} = "{param}"',
        )
    elif dtype == "fp16":
        report.note(
            f'mixed_precision {mp} is ignored: with {dtype_key} = "fp16" lorakit trains with '
            "fp16 mixed precision, which wins over the config"
        )
    else:
        report.note(
            f"mixed_precision {mp} autocasts the {dtype} base ({dtype_key}) to {param} in every "
            "rank; lorakit alone would compute in the recipe's dtype (set 'no' for that)"
        )


def _fsdp(report: Any, fsdp: dict[str, Any], recipe: Any, weights: str) -> None:
    if recipe.train.objective == "kto":
        report.problem(
            "distributed_type",
            'FSDP with [train].objective = "kto": KTO\'s reference log-probabilities set the '
            "adapter's starting weights back for one forward each step, which a sharded model "
            "does not allow",
            "train KTO under DDP: lorakit run RECIPE --nproc N (no launch config)",
        )
    elif recipe.train.objective == "dpo" and recipe.train.reference_logps == "every_step":
        report.problem(
            "distributed_type",
            'FSDP with [train].reference_logps = "every_step": the reference forward in each '
            "step switches the adapter off or sets its starting weights back, which lorakit "
            "does not do on a sharded model",
            'set train.reference_logps = "once" (or "auto", which is "once" under FSDP), or '
            "train under DDP: lorakit run RECIPE --nproc N",
        )
    if weights == "int8":
        report.problem(
            "distributed_type",
            f'FSDP with [quant].plugin = "{recipe.quant.name}": 8-bit bitsandbytes weights '
            "have no floating-point storage FSDP can shard (4-bit has bnb_4bit_quant_storage)",
            'use [quant].plugin = "bnb-4bit" (QLoRA) or DDP: lorakit run RECIPE --nproc N',
        )
    elif weights not in ("none", "nf4", "fp4"):
        report.note(
            f'[quant].plugin "{recipe.quant.name}": FSDP shards floating-point weights only; '
            "make sure this plugin stores its quantized weights in a float dtype"
        )
    version = str(fsdp.get("fsdp_version", "1"))
    default = "FULL_STATE_DICT" if version == "1" else "SHARDED_STATE_DICT"
    state = str(fsdp.get("fsdp_state_dict_type", default)).upper()
    state = {"1": "FULL_STATE_DICT", "2": "LOCAL_STATE_DICT", "3": "SHARDED_STATE_DICT"}.get(
        state, state
    )
    if state != "FULL_STATE_DICT":
        given = "" if "fsdp_state_dict_type" in fsdp else f" (not set: FSDP{version}'s default)"
        report.problem(
            "fsdp_config.fsdp_state_dict_type",
            f"{state}{given}: lorakit's checkpoints and adapter are adapter_model.safetensors "
            "files (resume verifies them, PEFT loads them), which the Trainer writes under FSDP "
            "only with FULL_STATE_DICT; other types write per-rank shards instead",
            "set fsdp_state_dict_type: FULL_STATE_DICT (the LoRA weights are small)",
        )
    if keys.truth(fsdp.get("fsdp_activation_checkpointing", False)):
        report.problem(
            "fsdp_config.fsdp_activation_checkpointing",
            "true: FSDP's checkpoint wrapper renames every layer's parameters "
            "(_checkpoint_wrapped_module), and PEFT, which picks the adapter's weights by "
            "module name, would save an adapter without them",
            "set fsdp_activation_checkpointing: false and use the recipe's "
            "[train].gradient_checkpointing = true (non-reentrant, works under FSDP)",
        )


def _deepspeed(report: Any, deepspeed: dict[str, Any], recipe: Any) -> None:
    if str(deepspeed.get("zero_stage", "")) == "3":
        report.problem(
            "deepspeed_config.zero_stage",
            "3 partitions the weights over the ranks, and lorakit's adapter save and "
            "evaluation during training are written for whole (DDP) or FSDP-sharded weights",
            "use zero_stage 2 (LoRA's optimizer state is small anyway), or FSDP "
            "(configs/accelerate_fsdp_lora.yaml) to shard the base",
        )
    pairs = (
        ("gradient_accumulation_steps", "gradient_accumulation_steps"),
        ("gradient_clipping", "max_grad_norm"),
    )
    for key, field in pairs:
        if key not in deepspeed:
            continue
        ours = getattr(recipe.train, field)
        try:
            same = float(deepspeed[key]) == float(ours)
        except (TypeError, ValueError):
            same = False
        if not same:
            report.problem(
                f"deepspeed_config.{key}",
                f"{deepspeed[key]!r} but the recipe's [train].{field} is {ours}: transformers "
                "refuses DeepSpeed values that differ from the Trainer's",
                f"leave {key} out (the recipe's value is used) or set it to {ours}",
            )
