"""Load a model's tokenizer and base model, quantize it, attach or load an adapter.

Every function takes the objects it uses (a ``ModelRef``, a quant backend, a PEFT method), built
once per run by :func:`lorakit.components.build_components`.

Only safetensors weights are loaded, and ``trust_remote_code`` stays off unless the model
source turns it on. Network failures become a ``ModelError`` that says how to work offline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorakit.contracts import FinishesLoading, ModelRef, ModelSource, PeftMethod, QuantBackend
from lorakit.distributed import local_rank
from lorakit.errors import ModelError, RunError
from lorakit.secrets import hub_token


def resolve_model(source: ModelSource, name: str = "") -> ModelRef:
    """Ask the model source (``components.model_source``; ``name``: its plugin name, for
    messages) where the model is. Sources may convert or check files here: resolve once."""
    ref = source.resolve()
    if not isinstance(ref, ModelRef):
        label = name or type(source).__name__
        raise ModelError(f"model plugin {label!r} returned {ref!r}, not a ModelRef")
    return ref


def _common_kwargs(ref: ModelRef, recipe_dir: Path | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": ref.trust_remote_code}
    if ref.revision:
        kwargs["revision"] = ref.revision
    if not Path(ref.path).exists():
        token = hub_token((Path.cwd(), recipe_dir) if recipe_dir else (Path.cwd(),))
        if token:
            kwargs["token"] = token
    return kwargs


def _load_error(exc: Exception, ref: ModelRef, what: str) -> ModelError:
    from lorakit.secrets import redact

    text = redact(str(exc), hub_token())
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if not Path(ref.path).exists():
        return ModelError(
            f"cannot load {what} {ref.label or ref.path!r}: {first}",
            where="[model]",
            fix="this needs the Hugging Face Hub: check the id, your network and HF_TOKEN; offline,"
            ' download once and use plugin = "local" with path = "<folder>"',
        )
    return ModelError(
        f"cannot load {what} from {ref.path}: {first}",
        where="[model]",
        fix="the folder must hold a transformers model saved with save_pretrained (safetensors)",
    )


def load_tokenizer(ref: ModelRef, *, recipe_dir: Path | None = None) -> Any:
    """The model's tokenizer (pad token set). ``recipe_dir``: where else to look for a ``.env``
    holding the Hub token, besides the working directory."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref.path, **_common_kwargs(ref, recipe_dir))
    except (OSError, ValueError) as exc:
        raise _load_error(exc, ref, "tokenizer") from exc
    if tok.pad_token is None:
        # Labels are built from masks, not from pad ids, so pad == eos cannot hide the EOS label.
        tok.pad_token = tok.eos_token
    return tok


@contextlib.contextmanager
def cpu_loading(quantizing: bool = True) -> Iterator[None]:
    """Around loading (and quantizing) a model on CPU: what loading frees goes back to the OS
    (:func:`lorakit.device.loading_memory`), and with ``quantizing`` 4-bit weights are quantized
    in chunks (:mod:`lorakit.quantize_cpu`: bitsandbytes' bytes, about 4x faster)."""
    from lorakit.device import loading_memory
    from lorakit.quantize_cpu import chunked_4bit_quantization

    with loading_memory(), chunked_4bit_quantization() if quantizing else contextlib.nullcontext():
        yield


def load_base_model(
    ref: ModelRef,
    backend: QuantBackend,
    device: str,
    *,
    quantized: bool = True,
    dtype: Any = None,
    recipe_dir: Path | None = None,
) -> Any:
    """The base model on ``device``, quantized by ``backend`` unless ``quantized=False``.

    ``dtype`` overrides the compute dtype (export merges in fp32); ``recipe_dir`` as in
    :func:`load_tokenizer`.
    """
    from transformers import AutoModelForCausalLM

    kwargs = _common_kwargs(ref, recipe_dir)
    if quantized:
        kwargs.update(backend.load_kwargs(device))
    else:
        kwargs["dtype"] = backend.compute_dtype(device)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if "quantization_config" in kwargs and kwargs["quantization_config"] is not None:
        # One whole model per process: device_map="auto" cannot be combined with DDP.
        kwargs["device_map"] = {"": f"cuda:{local_rank()}" if device == "cuda" else device}
    quantizing_on_cpu = device == "cpu" and quantized and backend.quantizes
    with cpu_loading() if quantizing_on_cpu else contextlib.nullcontext():
        try:
            model = AutoModelForCausalLM.from_pretrained(ref.path, use_safetensors=True, **kwargs)
        except (OSError, ValueError) as exc:
            raise _load_error(exc, ref, "model") from exc
        if "device_map" not in kwargs:
            model.to(f"cuda:{local_rank()}" if device == "cuda" else device)  # type: ignore[arg-type]
        if quantized and isinstance(backend, FinishesLoading):
            model = backend.finish_loading(model, device)
        if quantizing_on_cpu:
            release_weights_file(model)
    return model


def _file_mappings(suffix: str = ".safetensors") -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of files ending with ``suffix``."""
    ranges = []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(suffix):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def release_weights_file(model: Any) -> int:
    """Copy the parameters that still point into the memory-mapped safetensors file into
    ordinary memory, so the file's mapping is dropped; return how many were copied.

    A 4/8-bit model on CPU keeps its unquantized tensors (embeddings, norms) as views of the
    mapped checkpoint, and that keeps the whole mapping alive: every page read while the linear
    layers were quantized stays in the process's RSS for the whole run (405 MiB of SmolLM2's
    513 MiB fp32 file, measured with ``benchmarks/memory_stages.py``), more than the quantized
    weights themselves. Copying the views (112 MiB there) frees it. Tied weights stay tied: the
    same ``Parameter`` object gets the copy.
    """
    ranges = _file_mappings()
    if not ranges:
        return 0
    copied = 0
    for param in model.parameters():
        if not param.is_floating_point() or param.device.type != "cpu":
            continue
        ptr = param.untyped_storage().data_ptr()
        if any(start <= ptr < end for start, end in ranges):
            param.data = param.data.clone()
            copied += 1
    if copied:
        import gc

        gc.collect()
    return copied


def _linear_names(model: Any) -> list[str]:
    import torch

    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    )


def _check_target_modules(model: Any, targets: Any) -> None:
    """Every name in a list of ``target_modules`` matches a module (as PEFT matches: the full
    name or its last dotted parts); PEFT itself only fails when none matches."""
    from lorakit.target_modules import target_modules_error, unmatched

    if targets is None or isinstance(targets, str):  # "all-linear" or a regex: PEFT's rules
        return
    missing = unmatched((n for n, _ in model.named_modules()), list(targets))
    if missing:
        raise target_modules_error(missing, _linear_names(model))


def attach_new_adapter(
    model: Any, peft_method: PeftMethod, seed: int, *, config: Any = None
) -> Any:
    """Wrap ``model`` with a freshly initialised adapter of ``peft_method`` (seeded, so init is
    reproducible; ``config``: its ``peft_config()`` changed by the caller). Each name in a
    ``target_modules`` list must match a module of ``model``."""
    import torch
    from peft import get_peft_model

    config = peft_method.peft_config() if config is None else config
    _check_target_modules(model, getattr(config, "target_modules", None))
    torch.manual_seed(seed)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        if "target modules" not in str(exc).lower():
            raise
        raise ModelError(
            f"[peft].target_modules names no module of this model ({exc})",
            where="[peft].target_modules",
            fix=f'use "all-linear" or some of: {", ".join(_linear_names(model))}',
        ) from exc


def check_adapter_dir(adapter_dir: Path) -> None:
    """Fail clearly on a missing, truncated or non-finite adapter instead of loading garbage."""
    config = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not config.is_file() or not weights.is_file():
        from lorakit.rundir import no_adapter_fix

        is_run = (adapter_dir.parent / "run.json").is_file() and adapter_dir.name == "adapter"
        raise RunError(
            f"no adapter in {adapter_dir} (need adapter_config.json and adapter_model.safetensors)",
            fix=no_adapter_fix(adapter_dir.parent)
            if is_run
            else "point at a run folder's adapter/; train first with `lorakit run`",
        )
    import json

    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        settings = exc
    if not isinstance(settings, dict) or not isinstance(settings.get("peft_type"), str):
        what = (
            f"not valid JSON ({settings})"
            if isinstance(settings, Exception)
            else "not a PEFT adapter config (no peft_type)"
        )
        raise RunError(
            f"{config} is {what}",
            fix="the file is truncated or corrupt; copy the adapter again from where it was "
            "trained, or use an earlier checkpoint",
        )
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            import torch

            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensor = f.get_tensor(key)
                if not torch.isfinite(tensor).all():
                    raise RunError(
                        f"{weights}: tensor {key} holds NaN or Inf values",
                        fix="the adapter is corrupt (diverged training?); retrain or use an earlier checkpoint",
                    )
    except RunError:
        raise
    except Exception as exc:
        raise RunError(
            f"{weights}: cannot read adapter weights ({exc})",
            fix="the file is truncated or corrupt; re-export it or use an earlier checkpoint",
        ) from exc


def load_adapter(model: Any, adapter_dir: Path, *, trainable: bool = False) -> Any:
    """Load a saved adapter onto ``model``. ``trainable=True`` keeps it unfrozen (resume)."""
    from peft import PeftModel

    check_adapter_dir(adapter_dir)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def from_adapter_folder(recipe: Any) -> Path | None:
    """``train.from_adapter``'s adapter folder (a run folder's ``adapter/``, or the folder
    itself; relative to the recipe file), checked to hold an ``adapter_config.json``; None
    when the recipe starts from a fresh adapter. No torch: ``lorakit plan`` reads it too."""
    spec = recipe.train.from_adapter
    if spec is None:
        return None
    folder = Path(spec).expanduser()
    folder = folder if folder.is_absolute() else recipe.recipe_dir / folder
    if (folder / "adapter" / "adapter_config.json").is_file():
        folder = folder / "adapter"
    from lorakit.lora_init import checkpoint_refusal

    checkpoint_refusal(folder, "set train.from_adapter to the run folder", only_rewritten=True)
    if not (folder / "adapter_config.json").is_file():
        raise RunError(
            f"train.from_adapter = {spec!r}: {folder} holds no adapter",
            fix="point it at a finished run folder (runs/NAME) or an adapter folder "
            "(with adapter_config.json); the path is relative to the recipe file",
        )
    return folder


def start_adapter_dir(recipe: Any, ref: ModelRef | None) -> Path | None:
    """``train.from_adapter``, resolved: a run folder's ``adapter/`` or an adapter folder
    (relative to the recipe file), checked to exist and (with ``ref``) to have been trained on
    this base model (its ``lorakit.json``); None when the recipe starts from a fresh adapter."""
    folder = from_adapter_folder(recipe)
    if folder is None:
        return None
    meta_file = folder / "lorakit.json"
    if ref is not None and meta_file.is_file():
        from lorakit.rundir import read_json

        try:
            recorded = read_json(meta_file).get("base_model_path")
        except RunError as exc:  # damaged: one line naming the file, no JSONDecodeError
            raise RunError(
                f"train.from_adapter: {exc.message}",
                fix="copy the adapter folder again from the run that trained it, or point "
                "train.from_adapter at another adapter",
            ) from None
        trained_on = recorded if isinstance(recorded, str) and recorded else None
        if (
            trained_on is not None
            and Path(trained_on).exists()
            and Path(ref.path).exists()
            and Path(trained_on).resolve() != Path(ref.path).resolve()
        ):
            raise RunError(
                f"train.from_adapter: {folder} was trained on {trained_on}, this recipe's "
                f"model is {ref.path}",
                fix="use the [model] the adapter was trained on",
            )
    check_adapter_dir(folder)
    return folder
