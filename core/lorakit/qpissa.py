"""QPiSSA and QOLoRA: a PiSSA/OLoRA init on a 4-bit base, the principal part taken from the
full-precision weights and only the residual quantized; multi-pass LoftQ (``loftq_iter`` > 1)
takes the same road, its alternating fit made on the fp32 weights (:func:`_loftq_fit`).

PEFT decomposes whatever a layer holds; on a 4-bit model that is the dequantized 4-bit weight,
so the adapter would start from the quantization error's principal part. lorakit follows the
PiSSA paper (and PEFT's ``pissa_finetuning`` example, which saves the residual model and loads
it again in 4 bit), in memory:

1. :func:`compute_residual`: the base loaded unquantized in fp32 gets the run's adapter, seeded
   (PEFT's PiSSA/OLoRA init): the initial ``A0``/``B0`` and each adapted layer's residual
   ``W - s*B0@A0``; the fp32 model is then let go;
2. :func:`quantize_residual`: the base loaded 4-bit the way every QLoRA run loads it has each
   adapted layer's weight replaced by its residual, quantized with that layer's own settings
   (quant type, block size, double quant, storage);
3. :func:`attach_initial`: the adapter attached with ``A0``/``B0`` (kept for the conversion at
   save, ``lora_init.INITIAL``).

Exact SVD / QR in fp32 are deterministic and PiSSA's fast SVD draws from the seeded RNG, so
resume, eval, generate and export recompute the same residual. Downstream:

- the saved adapter is the plain LoRA delta ``s(B@A - B0@A0)`` against the original base
  (``lora_init.convert_to_plain_lora``); stock PEFT and ``--merge`` (original base) use it;
- the model as trained, ``Q(residual) + s*B@A`` (:func:`load_trained`, for eval, generate and
  export's parity reference), is rebuilt from that adapter: its first r ranks are ``A``/``B``,
  its last r must equal the recomputed ``A0``/``-B0`` (checked: a residual computed otherwise
  is an error, not a quietly different model). A raw ``checkpoint-N`` adapter, saved before the
  conversion, is ``A``/``B`` themselves and loads the same way;
- the base as trained in fp32 (``--merge-base dequantized``, ``--gguf --base-only``) is
  ``deq(Q(residual)) + s*B0@A0`` (:func:`add_principal`): with the converted adapter it is the
  trained model;
- :func:`adapter_off` scores the base: the adapter off *and* the original 4-bit weights back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from lorakit.errors import ModelError

PREFIX = "base_model.model."
ORIGINAL = "lorakit_original_4bit"  # attribute of the PeftModel: {module name: original weight}


@attrs.frozen
class Residual:
    """What the fp32 init leaves: per adapted base module, its residual weight (fp32) and
    scale; per adapter state-dict key, the initial ``A0``/``B0``."""

    weights: dict[str, Any]
    scaling: dict[str, float]
    initial: dict[str, Any]


def quantizes_residual(recipe: Any, quant: Any) -> bool:
    """Whether a run of ``recipe`` (with quant backend ``quant``) quantizes a residual:
    QPiSSA, QOLoRA or multi-pass LoftQ on a fresh adapter."""
    from lorakit.lora_init import residual_init

    return (
        residual_init(recipe.peft.options)
        and bool(quant.quantizes)
        and recipe.train.from_adapter is None
    )


def compute_residual(ref: Any, components: Any, seed: int, recipe_dir: Path | None) -> Residual:
    """Step 1: the run's adapter initialised (seeded) on the fp32 base, on the CPU."""
    import torch
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    from lorakit.lora_init import init_name, loftq_passes
    from lorakit.modeling import attach_new_adapter, load_base_model

    base = load_base_model(
        ref, components.quant, "cpu", quantized=False, dtype=torch.float32, recipe_dir=recipe_dir
    )
    model = attach_new_adapter(base, components.peft, seed)
    passes = loftq_passes(components.peft.options)
    weights: dict[str, Any] = {}
    scaling: dict[str, float] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            if init_name(components.peft.options) == "loftq":
                _loftq_fit(module, passes, components.quant.options)
            weights[name.removeprefix(PREFIX)] = module.get_base_layer().weight.data
            scaling[name.removeprefix(PREFIX)] = float(module.scaling["default"])
    initial = {
        k: t.detach().clone()
        for k, t in get_peft_model_state_dict(model).items()
        if ".lora_A." in k or ".lora_B." in k
    }
    return Residual(weights, scaling, initial)


def _loftq_fit(module: Any, passes: int, quant: Any) -> None:
    """LoftQ (Li et al. 2023) on one fp32 layer, in place: ``passes`` alternations of
    quantizing ``W - s*B@A`` to 4 bit and fitting ``s*B@A`` (rank r, SVD) to ``W - deq(Q)``;
    the layer keeps the last quantization's input, which :func:`quantize_residual` quantizes
    the same way. PEFT 0.21's own multi-pass ``loftq_init`` runs its quantization on CUDA
    only (``compute_device = "cuda"``), so it cannot start on a CPU."""
    import bitsandbytes as bnb
    import torch

    weight = module.get_base_layer().weight
    original = weight.data.to(torch.float32)
    r, s = module.r["default"], module.scaling["default"]
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    residual = original
    with torch.no_grad():
        for i in range(passes):
            q = bnb.nn.Params4bit(  # type: ignore[misc]
                residual.contiguous(),
                requires_grad=False,
                compress_statistics=quant.double_quant,
                quant_type=quant.quant_type,
            ).to("cpu")
            if q.quant_state is None:  # a bitsandbytes that quantizes 4-bit on CUDA only
                raise ModelError(
                    f"multi-pass LoftQ needs 4-bit quantization on the CPU, which bitsandbytes "
                    f"{bnb.__version__} does not do",
                    fix="pip install -U bitsandbytes (0.50 does), or leave [peft] loftq_iter out",
                )
            dequantized = bnb.functional.dequantize_4bit(q.data, q.quant_state)
            u, sv, vh = torch.linalg.svd(
                original - dequantized.to(torch.float32), full_matrices=False
            )
            root = torch.sqrt(sv[:r] / s)
            a.data = (root[:, None] * vh[:r]).to(a.dtype).contiguous()
            b.data = (u[:, :r] * root[None, :]).to(b.dtype).contiguous()
            if i + 1 < passes:
                residual = original - s * (b.data.to(torch.float32) @ a.data.to(torch.float32))
    weight.data = residual.to(weight.dtype)


def quantize_residual(model: Any, residual: Residual) -> None:
    """Step 2: each adapted layer of the loaded 4-bit ``model`` (the base, no adapter yet)
    holds its residual, quantized like the weight it replaces."""
    import bitsandbytes as bnb
    import torch

    done = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = residual.weights.get(name)
            if weight is None:
                continue
            old = module.weight
            if isinstance(module, bnb.nn.Linear4bit):
                module.weight = bnb.nn.Params4bit(  # type: ignore[misc]
                    weight.to(torch.float32).contiguous(),
                    requires_grad=False,
                    blocksize=old.blocksize,
                    compress_statistics=old.compress_statistics,
                    quant_type=old.quant_type,
                    quant_storage=old.quant_storage,
                    module=module,
                ).to(old.device)
            else:  # a layer the backend left unquantized keeps its residual as it is
                old.data = weight.to(device=old.device, dtype=old.dtype)
            done.add(name)
    missing = sorted(set(residual.weights) - done)
    if missing:
        raise ModelError(
            f"QPiSSA: the 4-bit model has no layer {missing[0]} adapted in fp32",
            where="[peft].init",
            fix='report this bug with the recipe; use [quant] plugin = "none" meanwhile',
        )


def attach_initial(model: Any, components: Any, seed: int, residual: Residual) -> Any:
    """Step 3: the adapter attached to the residual base with ``A0``/``B0``."""
    from lorakit.lora_init import INITIAL
    from lorakit.modeling import attach_new_adapter

    config = components.peft.peft_config()
    config.init_lora_weights = True  # no decomposition of the 4-bit residual: A0/B0 below
    model = attach_new_adapter(model, components.peft, seed, config=config)
    _load_lora(model, residual.initial)
    setattr(model, INITIAL, residual.initial)
    return model


def _load_lora(model: Any, state: dict[str, Any]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ModelError(
            f"QPiSSA: the adapter holds {unexpected[0]}, which the model has no place for",
            fix="export or evaluate the run with the recipe it was trained with",
        )


# --------------------------------------------------------------------------- downstream


def trained_state(adapter_dir: Path, residual: Residual) -> dict[str, Any]:
    """The trained ``A``/``B`` (and every other tensor) of the adapter in ``adapter_dir``:
    the converted adapter's first ranks (its last must be the recomputed start), or a raw
    checkpoint's weights as they are."""
    from safetensors.torch import load_file

    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out: dict[str, Any] = {}
    for key, tensor in saved.items():
        start = residual.initial.get(key)
        if start is None or tensor.shape == start.shape:  # not LoRA, or not converted
            out[key] = tensor
            continue
        r = start.shape[0] if ".lora_A." in key else start.shape[1]
        if ".lora_A." in key:
            trained, kept = tensor[:-r], tensor[-r:]
            same = kept.equal(start.to(kept))
        else:
            trained, kept = tensor[:, :-r], tensor[:, -r:]
            same = kept.equal(-start.to(kept))
        if not same:
            raise ModelError(
                f"{adapter_dir}: the PiSSA/OLoRA start saved in {key} differs from the one "
                "recomputed from the base now, so the 4-bit residual would not be the one "
                "trained on",
                where="[peft].init",
                fix="use the torch/peft versions and the base model the run was trained with; "
                "`lorakit export RUN --merge` (original base) needs no residual",
            )
        out[key] = trained.contiguous()
    return out


def load_trained(
    model: Any, adapter_dir: Path, components: Any, seed: int, residual: Residual
) -> Any:
    """The model as trained: ``model`` (the 4-bit base, residual not yet in) gets the residual,
    its original 4-bit weights kept for :func:`adapter_off`, and the adapter's trained A/B."""
    from lorakit.modeling import check_adapter_dir

    check_adapter_dir(adapter_dir)
    state = trained_state(adapter_dir, residual)
    original = {n: m.weight for n, m in model.named_modules() if n in residual.weights}
    quantize_residual(model, residual)
    model = attach_initial(model, components, seed, residual)
    _load_lora(model, state)
    setattr(model, ORIGINAL, original)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


@contextmanager
def adapter_off(model: Any) -> Iterator[Any]:
    """``model.disable_adapter()``, and for a QPiSSA model the original 4-bit weights in place
    of the residual while it lasts: the base model, exactly as a plain QLoRA run scores it."""
    original = getattr(model, ORIGINAL, None)
    if not original:
        with model.disable_adapter():
            yield model
        return
    modules = dict(model.named_modules())
    layers = {n: modules[f"{PREFIX}{n}.base_layer"] for n in original}
    residual = {n: m.weight for n, m in layers.items()}
    try:
        for name, module in layers.items():
            module.weight = original[name]
        with model.disable_adapter():
            yield model
    finally:
        for name, module in layers.items():
            module.weight = residual[name]


def add_principal(model: Any, residual: Residual) -> None:
    """``--merge-base dequantized`` / ``--gguf --base-only``: the dequantized residual base
    (plain fp32 layers) plus ``s*B0@A0`` per layer, the base the converted adapter applies to."""
    import torch

    with torch.no_grad():
        for name, module in model.named_modules():
            if name not in residual.weights:
                continue
            a0 = residual.initial[f"{PREFIX}{name}.lora_A.weight"].to(torch.float32)
            b0 = residual.initial[f"{PREFIX}{name}.lora_B.weight"].to(torch.float32)
            principal = residual.scaling[name] * (b0 @ a0)
            module.weight.data += principal.to(module.weight)
