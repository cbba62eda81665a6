"""LoRA inits that need more than PEFT's ``get_peft_model``: LoftQ, EVA, and the bookkeeping of
PiSSA/OLoRA, whose base weights are rewritten.

- ``pissa`` / ``olora`` (PEFT does the decomposition in ``get_peft_model``): the base keeps the
  residual ``W - s*B0@A0``. The initial ``A0``/``B0`` are kept on the model
  (:func:`initial_lora`) so that the saved adapter is converted to a plain LoRA delta against
  the *original* base, ``[A; A0]`` and ``[B, -B0]`` at rank 2r (PEFT's conversion,
  :func:`convert_to_plain_lora`): stock PEFT, ``--merge`` and ``--gguf`` then need no residual.
  Both inits are deterministic (exact SVD / QR; the fast SVD draws from the seeded RNG), so a
  resumed run recomputes the same residual before it loads its checkpoint.
- on a 4-bit base, PiSSA/OLoRA (QPiSSA) and LoftQ with ``loftq_iter`` > 1 start from the fp32
  weights and quantize only the residual: ``lorakit.qpissa``; the conversion below is the same.
- ``loftq``: the one-pass LoftQ of PEFT's ``replace_lora_weights_loftq``, written here because
  PEFT's runs on CUDA only: each 4-bit layer's ``A``/``B`` become the best rank-r fit of
  ``W - dequant(Q(W))`` (the original weights read from the model's safetensors). The quantized
  base is the one lorakit loads anyway, so nothing downstream changes.
- ``eva``: PEFT's ``initialize_lora_eva_weights`` on the first ``eva_batches`` micro-batches of
  the run's training rows, in split order (deterministic, so a resume redoes it identically).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lorakit.contracts import LoraInitOptions
from lorakit.errors import ModelError

REWRITES_BASE = ("pissa", "olora")
INITIAL = "lorakit_initial_lora"  # attribute of the PeftModel: {state-dict key: A0 or B0}


def init_name(options: Any) -> str:
    """The [peft] options' init (``default`` for methods without the option)."""
    return options.init if isinstance(options, LoraInitOptions) else "default"


def loftq_passes(options: Any) -> int:
    """LoftQ's alternations of quantization and low-rank fit (1 for other inits)."""
    return int(getattr(options, "loftq_iter", 1)) if init_name(options) == "loftq" else 1


def residual_init(options: Any) -> bool:
    """Whether the init, on a 4-bit base, starts from the fp32 weights and leaves the base a
    quantized residual (``lorakit.qpissa``): PiSSA, OLoRA, LoftQ with more than one pass."""
    return init_name(options) in REWRITES_BASE or loftq_passes(options) > 1


def finish_init(
    model: Any,
    peft_method: Any,
    *,
    model_path: str,
    train_rows: Sequence[Any],
    batch_size: int,
    say: Callable[[str], None],
) -> None:
    """Complete ``peft_method``'s init on ``model`` (just wrapped by ``attach_new_adapter``)."""
    options = peft_method.options
    init = init_name(options)
    if init in REWRITES_BASE:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
        setattr(
            model,
            INITIAL,
            {k: t.detach().clone() for k, t in state.items() if ".lora_A." in k or ".lora_B." in k},
        )
        say(f"{init} init: the base now holds the residual; the saved adapter is converted back")
    elif init == "loftq":
        n = loftq_one_pass(model, model_path)
        say(f"loftq init: {n} layers fitted to their 4-bit quantization error")
    elif init == "eva":
        n = eva_init(model, train_rows, batch_size, options.eva_batches)
        say(f"eva init: from {n} training examples' activations")


def checkpoint_refusal(folder: Path, use: str, *, only_rewritten: bool = False) -> None:
    """Raise ``RunError`` when ``folder`` is a run's ``checkpoints/checkpoint-N``: eval,
    generate and export read a run folder, and the adapter of a PiSSA/OLoRA run's checkpoint is
    not yet converted (it is relative to the residual base the run computed, so on the original
    base it is another model). ``only_rewritten``: refuse only such a checkpoint (a plain LoRA
    checkpoint's adapter is a valid adapter)."""
    import json

    from lorakit.errors import RunError

    run = folder.parent.parent
    if folder.parent.name != "checkpoints" or not (run / "run.json").is_file():
        return
    peft: dict[str, Any] = {}
    resolved = run / "resolved.json"
    if resolved.is_file():
        peft = json.loads(resolved.read_text(encoding="utf-8")).get("peft", {})
    init = peft.get("init")
    if init in REWRITES_BASE or (init == "loftq" and peft.get("loftq_iter", 1) > 1):
        raise RunError(
            f"{folder} is {folder.name} of the run {run}, whose [peft].init = {init!r} rewrote "
            "the base: a checkpoint's adapter is not converted yet (it applies to the residual "
            "base the run computed, not to the original model), so it cannot be used alone",
            fix=f"{use} ({run}): its adapter/ is converted; to use step "
            f"{folder.name.removeprefix('checkpoint-')}, train a run with that train.max_steps",
        )
    if not only_rewritten:
        from lorakit.rundir import no_adapter_fix

        final = (run / "adapter" / "adapter_config.json").is_file()
        raise RunError(
            f"{folder} is {folder.name} of the run {run}, not a run folder",
            fix=f"{use} ({run}); its adapter/ is the final adapter"
            if final
            else f"{use} ({run}) once it has its adapter/: {no_adapter_fix(run)}",
        )


def initial_lora(model: Any) -> dict[str, Any] | None:
    """The initial A0/B0 of a PiSSA/OLoRA adapter (None for inits that keep the base)."""
    return getattr(model, INITIAL, None)


def rewrites_base(model: Any) -> bool:
    return initial_lora(model) is not None


# --------------------------------------------------------------------------- conversion


def convert_to_plain_lora(folder: Path, initial: dict[str, Any]) -> None:
    """Rewrite the PiSSA/OLoRA adapter saved in ``folder`` as a plain LoRA delta against the
    original base, in place: ``ΔW = s(B@A - B0@A0) = s'[B, -B0]@[A; A0]`` at rank 2r with
    alpha doubled (scale unchanged; with rsLoRA, alpha times sqrt(2)). Unlike PEFT's
    ``save_pretrained(path_initial_model_for_weight_conversion=...)`` it keeps every other
    tensor (``modules_to_save``, DoRA magnitudes), which PEFT 0.21 drops."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    weights = folder / "adapter_model.safetensors"
    trained = load_file(str(weights))
    out: dict[str, Any] = {}
    for key, tensor in trained.items():
        start = initial.get(key)
        if ".lora_A." in key and start is not None:
            out[key] = torch.cat([tensor, start.to(tensor)], dim=0).contiguous()
        elif ".lora_B." in key and start is not None:
            out[key] = torch.cat([tensor, -start.to(tensor)], dim=1).contiguous()
        else:
            out[key] = tensor
    missing = [k for k in initial if k not in trained]
    if missing:
        raise ModelError(
            f"cannot convert the adapter to a plain LoRA: {missing[0]} was not saved",
            fix="report this bug with the run folder",
        )
    save_file(out, str(weights), metadata={"format": "pt"})
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["r"] = 2 * config["r"]
    config["lora_alpha"] = config["lora_alpha"] * (2**0.5 if config.get("use_rslora") else 2)
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            config[key] = {k: 2 * v for k, v in config[key].items()}
    config["init_lora_weights"] = True
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


# --------------------------------------------------------------------------- LoftQ


def _weight_files(model_path: str) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for a local model folder."""
    from safetensors import safe_open

    folder = Path(model_path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise ModelError(
            f'[peft].init = "loftq" reads the unquantized weights from the model\'s safetensors '
            f"files, and {model_path} has none on this machine",
            where="[peft].init",
            fix='download the model once and use [model] plugin = "local", or another init',
        )
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                where[key] = file
    return where


def loftq_one_pass(model: Any, model_path: str) -> int:
    """Set each 4-bit LoRA layer's A/B to the rank-r SVD of ``W - dequant(Q(W))`` divided by
    the layer's scale, so that ``Q(W) + s*B@A`` is the closest rank-r correction of ``Q(W)``
    to ``W``. Returns the number of layers fitted."""
    import bitsandbytes as bnb
    import torch
    from safetensors import safe_open

    files = _weight_files(model_path)
    prefix = "base_model.model."
    fitted = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not (isinstance(getattr(module, "base_layer", None), bnb.nn.Linear4bit)):
                continue
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            key = name.removeprefix(prefix) + ".weight"
            if key not in files:
                raise ModelError(
                    f"loftq: no tensor {key} in the model's safetensors files",
                    where="[peft].init",
                    fix="use another init for this model",
                )
            with safe_open(str(files[key]), framework="pt") as f:
                original = f.get_tensor(key).to(torch.float32)
            weight = module.base_layer.weight
            quantized = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
            residual = original.to(quantized.device) - quantized.to(torch.float32)
            r = module.r["default"]
            u, s, vh = torch.linalg.svd(residual, full_matrices=False)
            root = torch.sqrt(s[:r] / module.scaling["default"])
            a = module.lora_A["default"].weight
            b = module.lora_B["default"].weight
            a.data = (root[:, None] * vh[:r]).to(a.dtype).contiguous()
            b.data = (u[:, :r] * root[None, :]).to(b.dtype).contiguous()
            fitted += 1
    if not fitted:
        raise ModelError(
            '[peft].init = "loftq" found no 4-bit LoRA layer to fit',
            where="[peft].init",
            fix='use [quant] plugin = "bnb-4bit"',
        )
    return fitted


# --------------------------------------------------------------------------- EVA


def eva_init(model: Any, train_rows: Sequence[Any], batch_size: int, batches: int) -> int:
    """PEFT's EVA on the first ``batches`` micro-batches of ``train_rows`` (padded, attention
    mask and labels so only supervised tokens count). Returns the examples read."""
    import torch
    from peft import initialize_lora_eva_weights

    rows = list(train_rows[: batch_size * batches])
    if not rows:
        raise ModelError(
            '[peft].init = "eva" needs training rows to read activations from, and the '
            "training split is empty",
            where="[peft].init",
            fix="add training data or use another init",
        )
    device = next(p.device for p in model.parameters())
    loader = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        width = max(len(r.input_ids) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for j, r in enumerate(chunk):
            n = len(r.input_ids)
            ids[j, :n] = torch.tensor(list(r.input_ids))
            mask[j, :n] = 1
            labels[j, :n] = torch.tensor(list(r.labels))
        loader.append(
            {
                "input_ids": ids.to(device),
                "attention_mask": mask.to(device),
                "labels": labels.to(device),
            }
        )
    was_training = model.training
    model.eval()
    initialize_lora_eva_weights(model, loader, show_progress_bar=False)
    model.train(was_training)
    return len(rows)
