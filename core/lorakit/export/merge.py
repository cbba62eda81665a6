"""Merge an adapter into an fp32 base, then cast: the only safe way for QLoRA.

Merging into 4-bit weights would re-quantize the sum and ruin quality (transformers#31293), so
the merge always happens on fp32 weights, with peft's ``safe_merge`` (which refuses NaN), and
only then is the result cast to the export dtype. A finite-weights guard runs after the merge
and again after the cast (fp16 overflows to Inf for large weights).

Two bases to merge into (``--merge-base``):

- ``original`` (default): the base checkpoint loaded unquantized in fp32. The merged model is
  the original weights plus the adapter; for a QLoRA run that is not quite the model that was
  trained, since the adapter learned to correct the 4-bit base.
- ``dequantized``: the base loaded quantized exactly as in training, then dequantized to fp32.
  The merged model reproduces the trained model (quantized base + adapter) to fp32 noise, at the
  cost of carrying the quantization error into full-size weights.

A run trained in bf16 compute (``auto`` on CPUs with fast bf16, and on GPUs) is not an fp32
function, so "reproduces the trained model" is checked in two parts: the trained weights (4-bit
base + adapter) evaluated in fp32 arithmetic must equal the dequantized fp32 model to fp32
noise (``FP32_TOLERANCE``: this is what catches a wrong dequantization or merge), and the
parity report shows the as-trained bf16 model next to them, so the bf16 arithmetic's own share
of the difference is visible rather than hidden in a loose tolerance.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from lorakit.contracts import ComputeDtypeSwitch
from lorakit.device import torch_dtype
from lorakit.errors import RunError
from lorakit.load_run import as_trained
from lorakit.progress import enabled as progress_bars

MERGE_BASES = ("original", "dequantized")


def check_finite(model: Any, stage: str) -> None:
    """Raise ``RunError`` naming the first parameter that holds NaN or Inf."""
    import torch

    for name, tensor in model.state_dict().items():
        # A sum is NaN or Inf exactly when some element is (fp32 sums of weights cannot
        # overflow), and is much cheaper than materialising isfinite's boolean mask.
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
            raise RunError(
                f"merged weight {name} holds NaN or Inf values {stage}",
                fix="export in fp32 or bf16 (fp16 overflows for large weights), or check the "
                "adapter: `lorakit eval` on the run should give a finite loss",
            )


def _keep_tied_embeddings_honest(model: Any) -> None:
    """If the merge changed lm_head but not the embeddings they were tied to, untie them.

    peft merges tied layers together, so normally both stay one tensor; this only fires when
    they came apart, and then saving with ``tie_word_embeddings=True`` would drop lm_head.
    """
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", False):
        return
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or inp.weight is out.weight:
        return
    if inp.weight.shape == out.weight.shape and bool((inp.weight == out.weight).all()):
        return
    text_config.tie_word_embeddings = False
    config.tie_word_embeddings = False


def untie_adapted_embeddings(model: Any) -> bool:
    """Give the output head its own weight where it is tied to the input embeddings and the
    adapter (a PEFT model) adapts either of them; True if it did.

    A tied model (SmolLM2) shares one tensor between the embeddings and the head, and LoRA on
    ``lm_head`` (or on ``embed_tokens``) trained a delta for one side only. Merged into the
    shared tensor it would change both; untied first, the merge changes the adapted side and
    the export holds both tensors (``tie_word_embeddings`` off), which is the function trained.
    The logits do not change."""
    import torch

    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", False):
        return False
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None:
        return False

    def plain(layer: Any) -> Any:
        return getattr(layer, "base_layer", layer)

    adapted = any(
        hasattr(layer, "lora_A") or hasattr(layer, "lora_embedding_A") for layer in (inp, out)
    )
    head = plain(out)
    if not adapted or plain(inp).weight is not head.weight:
        return False
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    text_config.tie_word_embeddings = False
    config.tie_word_embeddings = False
    return True


def merge_adapter(peft_model: Any) -> Any:
    """``merge_and_unload(safe_merge=True)`` on an fp32 base; returns the plain model."""
    try:
        merged = peft_model.merge_and_unload(safe_merge=True, progressbar=progress_bars())
    except ValueError as exc:
        raise RunError(
            f"merging the adapter produced broken weights: {exc}",
            fix="the adapter is probably corrupt (diverged training); use an earlier checkpoint",
        ) from exc
    _keep_tied_embeddings_honest(merged)
    check_finite(merged, "after the fp32 merge")
    return merged


def cast_merged(model: Any, dtype_name: str) -> Any:
    """Cast the merged fp32 model to ``dtype_name`` and guard the result."""
    if dtype_name == "fp32":
        return model
    model = model.to(torch_dtype(dtype_name))
    check_finite(model, f"after casting to {dtype_name}")
    return model


def _check_tolerance(
    row: dict[str, Any], logits: list[Any], unmerged: list[Any], what: str = "the fp32 merge"
) -> None:
    """The merge must not change the function: compare with the same fp32 base, unmerged."""
    from lorakit.export.parity import FP32_TOLERANCE, max_abs_diff

    diff = max_abs_diff(unmerged, logits)
    if diff > FP32_TOLERANCE:
        raise RunError(
            f"{row['model']}: {what} changes logits by up to {diff:.3g} "
            f"(tolerance {FP32_TOLERANCE:g}); nothing was exported",
            fix="report this with the run folder; the run's adapter/ folder still works unmerged",
        )


def merge_base_label(merge_base: str, recipe: Any) -> str:
    if merge_base == "dequantized":
        return f"dequantized {recipe.quant.name} (fp32)"
    return "unquantized fp32"


def _dequantized_base(loaded: Any, say: Callable[[str], None]) -> Any:
    """The base quantized as in training, then dequantized to plain fp32 ``nn.Linear`` layers."""
    import torch

    from lorakit.modeling import load_base_model
    from lorakit.qpissa import (
        add_principal,
        compute_residual,
        quantize_residual,
        quantizes_residual,
    )

    recipe = loaded.recipe
    if not loaded.components.quant.quantizes:
        raise RunError(
            "--merge-base dequantized needs a run trained on a quantized base, and this run's "
            f"[quant].plugin {recipe.quant.name!r} does not quantize",
            fix="drop --merge-base (the original base is exactly the one this run trained on)",
        )
    say(f"loading the base as trained ({recipe.quant.name}), then dequantizing it to fp32")
    residual = None
    if quantizes_residual(recipe, loaded.components.quant):  # QPiSSA: the residual, quantized
        residual = compute_residual(
            loaded.ref, loaded.components, recipe.train.seed, recipe.recipe_dir
        )
    base = load_base_model(
        loaded.ref, loaded.components.quant, loaded.device, recipe_dir=recipe.recipe_dir
    )
    if residual is not None:
        quantize_residual(base, residual)
    if getattr(base, "hf_quantizer", None) is None:
        raise RunError(
            f"the {recipe.quant.name} backend did not load a transformers-quantized model, so "
            "there is nothing to dequantize",
            fix="drop --merge-base to merge into the original base",
        )
    try:
        base = base.dequantize(dtype=torch.float32)
    except (NotImplementedError, ValueError) as exc:
        raise RunError(
            f"transformers cannot dequantize a {recipe.quant.name} model: {exc}",
            fix="drop --merge-base to merge into the original base",
        ) from exc
    base = base.to(torch.float32)
    if residual is not None:  # + s*B0@A0: the base the converted adapter applies to
        add_principal(base, residual)
    return base


def merge_fp32(
    run: Any,
    loaded: Any,
    probes: Any,
    say: Callable[[str], None],
    merge_base: str = "original",
) -> tuple[Any, Any, list[Any]]:
    """Load the fp32 merge base with the adapter, measure it, merge; return (merged model,
    parity report against the reference, logits of the unmerged fp32 model)."""
    model, report, unmerged = base_with_adapter_fp32(run, loaded, probes, say, merge_base)
    return merge_adapter(model), report, unmerged


Merged = tuple[Any, Any, list[Any]]  # (merged model, parity report, unmerged probe logits)


class SharedMerge:
    """:func:`merge_fp32` for an export that uses the merged fp32 model more than once
    (``--merge --gguf``): the first call loads and merges, the later ones get the same model
    (merging a 7B base in fp32 is a 28 GB load and minutes of CPU), and the last one lets it
    go. Whoever takes it must not change it in place before the last use: the GGUF files are
    written from it before ``--merge`` casts it to its export dtype."""

    def __init__(self, uses: int) -> None:
        self._uses = uses
        self._merged: Merged | None = None

    def __call__(
        self,
        run: Any,
        loaded: Any,
        probes: Any,
        say: Callable[[str], None],
        merge_base: str = "original",
    ) -> Merged:
        merged = self._merged or merge_fp32(run, loaded, probes, say, merge_base)
        self._uses -= 1
        self._merged = merged if self._uses > 0 else None
        return merged


def base_with_adapter_fp32(
    run: Any,
    loaded: Any,
    probes: Any,
    say: Callable[[str], None],
    merge_base: str = "original",
) -> tuple[Any, Any, list[Any]]:
    """The fp32 base ``merge_base`` names with the adapter attached, unmerged, checked against
    the reference; return (peft model, parity report, its probe logits)."""
    import torch

    from lorakit.export.parity import ParityReport, probe_logits
    from lorakit.modeling import load_adapter, load_base_model

    recipe = loaded.recipe
    if merge_base == "dequantized":
        # Reference: the model as trained, the quantized base with the adapter attached, in
        # the compute dtype of training (load_run.as_trained).
        report = ParityReport(
            probes,
            _as_trained_logits(loaded, run, probes),
            f"{recipe.quant.name} base + adapter (as trained)",
        )
        exact = report.reference
        trained_in = loaded.components.quant.compute_dtype(loaded.device)
        if trained_in != torch.float32 and isinstance(loaded.components.quant, ComputeDtypeSwitch):
            # bf16 arithmetic is not what a merge can be held to: the same trained weights in
            # fp32 arithmetic are (the fp32 merge must match them to fp32 noise)
            fp32 = attrs.evolve(loaded, components=as_trained(loaded.components, "fp32"))
            exact = _as_trained_logits(fp32, run, probes)
            report.add(
                "as_trained_fp32",
                f"{recipe.quant.name} base + adapter (as trained, fp32 arithmetic)",
                exact,
            )
        base = _dequantized_base(loaded, say)
        model = load_adapter(base, run.adapter, trainable=False)
        _untie(model, say)
        model.eval()
        unmerged = probe_logits(model, probes)
        row = report.add("unmerged", "dequantized fp32 base + adapter (unmerged)", unmerged)
        _check_tolerance(row, unmerged, exact, "dequantizing the trained base")
    else:
        # Reference: the unquantized fp32 base with the adapter attached, unmerged.
        say("loading the base unquantized in fp32 for the merge")
        base = load_base_model(
            loaded.ref,
            loaded.components.quant,
            loaded.device,
            quantized=False,
            dtype=torch.float32,
            recipe_dir=recipe.recipe_dir,
        )
        model = load_adapter(base, run.adapter, trainable=False)
        _untie(model, say)
        model.eval()
        unmerged = probe_logits(model, probes)
        report = ParityReport(probes, unmerged, "fp32 unquantized base + adapter (unmerged)")
    return model, report, unmerged


def _untie(model: Any, say: Callable[[str], None]) -> None:
    if untie_adapted_embeddings(model):
        say(
            "the adapter adapts the embeddings or the head, which the base ties together: the "
            "merged model holds both (tie_word_embeddings off)"
        )


def _as_trained_logits(loaded: Any, run: Any, probes: Any) -> list[Any]:
    """Probe logits of the quantized base + adapter, loaded as ``loaded`` says."""
    from lorakit.export.parity import probe_logits
    from lorakit.load_run import load_model

    model = load_model(loaded, run.adapter, quantized=True)
    logits = probe_logits(model, probes)
    del model
    gc.collect()
    return logits


def write_merged(
    run: Any,
    loaded: Any,
    folder: Path,
    dtype_name: str,
    generation_config: Any,
    say: Callable[[str], None],
    merge_base: str = "original",
    merge: Callable[..., Merged] = merge_fp32,
) -> dict[str, Any]:
    """Merge (``merge``: a :class:`SharedMerge` when the GGUF export merged already), cast,
    save to ``folder``, measure parity; return the parity record."""
    from transformers import AutoModelForCausalLM

    from lorakit.export.parity import build_probes, probe_logits

    device = loaded.device
    probes = build_probes(run.path, loaded.formatter, loaded.tokenizer)
    merged, report, unmerged = merge(run, loaded, probes, say, merge_base)
    if dtype_name != "fp32":
        # Check the merge itself before the cast blurs it; for fp32 the reload below does.
        logits = probe_logits(merged, probes)
        row = report.add("merged_in_memory", "merged, fp32 in memory", logits)
        _check_tolerance(row, logits, unmerged)
    merged = cast_merged(merged, dtype_name)
    merged.generation_config = generation_config
    merged.save_pretrained(str(folder))
    loaded.tokenizer.save_pretrained(str(folder))
    generation_config.save_pretrained(str(folder))
    if any(folder.glob("*.bin")) or not any(folder.glob("*.safetensors")):
        raise RunError(
            f"the merged model in {folder} was not saved as safetensors", fix="report this bug"
        )
    del merged
    gc.collect()
    say(f"merged model written ({dtype_name})")

    # The merged model as a stock user loads it: from disk, in the exported dtype.
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype(dtype_name)).to(
        device
    )
    logits = probe_logits(reloaded, probes)
    row = report.add("merged", f"merged {dtype_name}, reloaded from disk", logits)
    if dtype_name == "fp32":
        _check_tolerance(row, logits, unmerged)
    del reloaded
    gc.collect()

    if loaded.components.quant.quantizes and merge_base != "dequantized":
        from lorakit.load_run import load_model

        quant = load_model(loaded, run.adapter, quantized=True)
        report.add(
            "quantized",
            f"{loaded.recipe.quant.name} base + adapter (as trained)",
            probe_logits(quant, probes),
        )
        del quant
        gc.collect()

    for line in report.lines():
        say(line)
    return {
        **report.to_json(),
        "merge_base": merge_base_label(merge_base, loaded.recipe),
        "dtype": dtype_name,
    }
