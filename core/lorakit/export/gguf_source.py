"""What the GGUF files of ``lorakit export --gguf`` hold, and the logits they are held to.

``merged_source``: the merged fp32 model, exactly as ``--merge`` makes it. ``base_source``
(``--base-only``): the base as trained, without the adapter, plus the trained model's logits;
``check_with_adapter`` then holds each base file, with the run's adapter attached, to them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs


@attrs.frozen
class Source:
    """What the GGUF files hold, the logits they are held to, and (base-only) the trained
    model's logits that the base file + the adapter must reproduce."""

    model: Any
    report: Any  # ParityReport against the logits of ``model`` in memory
    trained: list[Any] | None = None
    trained_report: Any = None


def merged_source(
    run: Any,
    loaded: Any,
    probes: Any,
    say: Callable[[str], None],
    merge_base: str,
    merge: Callable[..., Any] | None = None,
) -> Source:
    """The merged fp32 model, exactly as ``--merge`` makes it (``merge``: a
    ``merge.SharedMerge`` that ``--merge`` then reuses; default ``merge_fp32``)."""
    from lorakit.export.merge import _check_tolerance, merge_fp32
    from lorakit.export.parity import ParityReport, probe_logits

    merged, first, unmerged = (merge or merge_fp32)(run, loaded, probes, say, merge_base)
    reference = probe_logits(merged, probes)
    report = ParityReport(probes, reference, "merged fp32 model (transformers, in memory)")
    row = report.add(
        "unmerged", first.rows.get("unmerged", {}).get("model", first.reference_label), unmerged
    )
    _check_tolerance(row, reference, unmerged)
    return Source(merged, report)


def base_merge_base(loaded: Any) -> str:
    """The base a run was trained on, in fp32: dequantized when the backend quantizes (the
    adapter learned to correct exactly those weights), else the original checkpoint."""
    return "dequantized" if loaded.components.quant.quantizes else "original"


def base_source(run: Any, loaded: Any, probes: Any, say: Callable[[str], None]) -> Source:
    """The base as trained in fp32, without the adapter; the trained model (that base with the
    adapter attached, checked against the run's own weights as ``--merge`` checks it) is what
    the base file + the adapter must reproduce."""
    from lorakit.export.merge import base_with_adapter_fp32, merge_base_label
    from lorakit.export.parity import ParityReport, probe_logits

    merge_base = base_merge_base(loaded)
    model, first, trained = base_with_adapter_fp32(run, loaded, probes, say, merge_base)
    base = model.unload()  # the adapter layers removed, nothing merged
    label = f"base as trained ({merge_base_label(merge_base, loaded.recipe)}), in memory"
    return Source(base, ParityReport(probes, probe_logits(base, probes), label), trained, first)


def check_with_adapter(
    model: Any, run: Any, probes: Any, source: Source, gguf_type: str
) -> dict[str, Any]:
    """Attach the run's adapter to the base read back from the GGUF and compare with the
    trained model; the f32 file must reproduce it to fp32 noise."""
    from lorakit.errors import RunError
    from lorakit.export.parity import FP32_TOLERANCE, max_abs_diff, perplexity, probe_logits
    from lorakit.modeling import load_adapter

    assert source.trained is not None
    logits = probe_logits(load_adapter(model, run.adapter, trainable=False), probes)
    diff = max_abs_diff(source.trained, logits)
    row = {
        "reference": source.trained_report.rows.get("unmerged", {}).get(
            "model", source.trained_report.reference_label
        ),
        "max_abs_logit_diff": diff,
        "ppl": perplexity(logits, probes),
        "trained_ppl": perplexity(source.trained, probes),
    }
    if gguf_type == "f32":
        row["tolerance"] = {"max_abs": FP32_TOLERANCE}
        if not diff <= FP32_TOLERANCE:
            raise RunError(
                f"the f32 base GGUF read back with the run's adapter differs from the trained "
                f"model by {diff:.3g} (tolerance {FP32_TOLERANCE:g}); nothing was exported",
                fix="report this with the run folder; export without --base-only meanwhile",
            )
    return row
