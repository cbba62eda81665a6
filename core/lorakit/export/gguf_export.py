"""``lorakit export --gguf``: merged GGUF files, an Ollama Modelfile, an adapter GGUF, parity.

Writes into the export's ``gguf/`` folder::

    <run>-<TYPE>.gguf     the merged model per --gguf-type, tokenizer + chat template + stop ids
                          (``--base-only``: <run>-base-<TYPE>.gguf, the base as trained)
    <run>-lora-F32.gguf   the adapter alone for llama.cpp's --lora (when the format can hold it)
    Modelfile             Ollama: FROM, TEMPLATE (translated chat template), PARAMETER stop
    parity.json           every file read back and compared; README.md the model card

Order: check what a GGUF cannot hold before loading weights (``preflight``), merge in fp32
exactly like ``--merge``, then per type write, read back with transformers, compare. Any check
that fails raises, and the caller's temporary folder is discarded: nothing is exported.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from lorakit.export.gguf_spm import choose_space_prefix
from lorakit.export.gguf_vocab import Vocab, read_vocab
from lorakit.export.gguf_writer import check_layout, write_gguf
from lorakit.export.llama_quantize import K_QUANTS, Quantizer, find_quantizer, quantize


def preflight(loaded: Any, base_path: str) -> Vocab:
    """Refuse an architecture or tokenizer GGUF export cannot represent; no weights loaded."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_path)
    check_layout(config)
    return read_vocab(loaded.tokenizer, config.vocab_size, loaded.end_of_turn)


def preflight_types(types: Sequence[str]) -> Quantizer | None:
    """The llama.cpp quantizer when a K-quant is asked for (``RunError`` if there is none)."""
    return find_quantizer() if any(t in K_QUANTS for t in types) else None


def _write_file(
    model: Any,
    vocab: Vocab,
    path: Path,
    gguf_type: str,
    quantizer: Quantizer | None,
    name: str,
    description: str,
) -> dict[str, Any]:
    """Write one GGUF: directly, or for a K-quant an f32 file quantized by llama.cpp."""
    if gguf_type not in K_QUANTS:
        return write_gguf(model, vocab, path, gguf_type, name=name, description=description)
    assert quantizer is not None
    source = path.with_name(f".{path.stem}.f32-source.gguf")
    try:
        info = write_gguf(model, vocab, source, "f32", name=name, description=description)
        quantize(quantizer, source, path, gguf_type)
    finally:
        source.unlink(missing_ok=True)
    return {
        **info,
        "type": gguf_type,
        "bytes": path.stat().st_size,
        "quantizer": quantizer.describe(),
    }


def _probe_texts(run: Any, loaded: Any) -> list[str]:
    """Texts llama.cpp will tokenize: the probe conversations and the train split rendered as
    in training, full and as generation prompts."""
    from lorakit.contracts import Example, Message
    from lorakit.export.parity import BUILTIN_PROBES, split_examples

    examples = (
        [
            Example(id=f"probe{i}", messages=tuple(Message(r, c) for r, c in conv))
            for i, conv in enumerate(BUILTIN_PROBES)
        ]
        + split_examples(run.path, "val")
        + split_examples(run.path, "train", 50)
    )
    texts = []
    for ex in examples:
        texts.append(loaded.formatter.render(ex, loaded.tokenizer).text)
        if ex.messages and ex.messages[-1].role == "assistant":
            texts.append(loaded.formatter.render_prompt(ex.messages[:-1], loaded.tokenizer))
    return texts


def file_name(run_name: str, gguf_type: str, base_only: bool = False) -> str:
    return f"{run_name}{'-base' if base_only else ''}-{gguf_type.upper()}.gguf"


@attrs.frozen
class Source:
    """What the GGUF files hold, the logits they are held to, and (base-only) the trained
    model's logits that the base file + the adapter must reproduce."""

    model: Any
    report: Any  # ParityReport against the logits of ``model`` in memory
    trained: list[Any] | None = None
    trained_report: Any = None


def _merged_source(
    run: Any, loaded: Any, probes: Any, say: Callable[[str], None], merge_base: str
) -> Source:
    """The merged fp32 model, exactly as ``--merge`` makes it."""
    from lorakit.export.merge import _check_tolerance, merge_fp32
    from lorakit.export.parity import ParityReport, probe_logits

    merged, first, unmerged = merge_fp32(run, loaded, probes, say, merge_base)
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


def _base_source(run: Any, loaded: Any, probes: Any, say: Callable[[str], None]) -> Source:
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


def _check_with_adapter(
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


def _adapter_gguf(
    run: Any, config: Any, folder: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    from lorakit.export.gguf_adapter import (
        check_adapter_gguf,
        unsupported_reason,
        write_adapter_gguf,
    )
    from lorakit.rundir import read_json

    adapter_config = read_json(run.adapter / "adapter_config.json")
    reason = unsupported_reason(adapter_config)
    if reason is not None:
        say(f"no adapter GGUF: {reason}")
        return {"written": False, "reason": reason}
    path = folder / f"{run.path.name}-lora-F32.gguf"
    info = write_adapter_gguf(run.adapter, adapter_config, config, path, f"{run.path.name} LoRA")
    check = check_adapter_gguf(path, run.adapter, adapter_config, config)
    say(f"adapter GGUF written ({path.name}, {info['modules']} modules, read back exactly)")
    return {"written": True, "file": path.name, **info, **check}


def write_gguf_export(
    run: Any,
    loaded: Any,
    folder: Path,
    types: Sequence[str],
    vocab: Vocab,
    say: Callable[[str], None],
    merge_base: str = "original",
    base_only: bool = False,
    quantizer: Quantizer | None = None,
) -> dict[str, Any]:
    """Write and check every GGUF file into ``folder``; return the ``parity.json`` record.

    ``base_only``: the files hold the base as trained (dequantized for a quantized run)
    instead of the merged model; each is also read back with the run's adapter attached and
    compared with the trained model."""
    import transformers

    from lorakit import __version__
    from lorakit.export.gguf_parity import (
        argmax_agreement,
        check_template,
        check_tokenizer,
        check_tolerance,
        read_model,
        read_tokenizer,
    )
    from lorakit.export.merge import merge_base_label
    from lorakit.export.modelfile import jinja_renderer, render_modelfile, translate
    from lorakit.export.parity import build_probes, probe_logits, split_examples

    folder.mkdir(parents=True, exist_ok=True)
    probes = build_probes(run.path, loaded.formatter, loaded.tokenizer)
    spm_check = None
    if vocab.model == "llama":
        # Before any weights: the space prefix under which llama.cpp splits like training.
        prefix, spm_check = choose_space_prefix(vocab, _probe_texts(run, loaded), loaded.tokenizer)
        vocab = attrs.evolve(vocab, add_space_prefix=prefix)
    if base_only:
        merge_base = base_merge_base(loaded)
        source = _base_source(run, loaded, probes, say)
    else:
        source = _merged_source(run, loaded, probes, say, merge_base)
    merged, report = source.model, source.report
    reference = report.reference

    files: dict[str, Any] = {}
    template_check: dict[str, Any] = {}
    tokenizer_check: dict[str, Any] = {}
    translation = None
    for gguf_type in types:
        path = folder / file_name(run.path.name, gguf_type, base_only)
        description = (
            f"base model of {run.path.name} as trained (lorakit {__version__}); apply "
            f"{run.path.name}-lora-F32.gguf with --lora"
            if base_only
            else f"{run.path.name}, fine-tuned with lorakit {__version__}"
        )
        files[gguf_type] = _write_file(
            merged, vocab, path, gguf_type, quantizer, run.path.name, description
        )
        say(
            f"GGUF written ({path.name}, {files[gguf_type]['bytes'] / 2**20:.1f} MiB); reading it back"
        )
        model = read_model(path, loaded.device)
        logits = probe_logits(model, probes)
        row = report.add(
            f"gguf_{gguf_type}",
            f"GGUF {gguf_type}{' (base)' if base_only else ''}, read back by transformers",
            logits,
            file=path.name,
            argmax_agreement=argmax_agreement(reference, logits),
        )
        check_tolerance(row, gguf_type, reference, report.reference_ppl)
        if base_only:
            row["with_adapter"] = _check_with_adapter(model, run, probes, source, gguf_type)
        del model
        gc.collect()
        if not tokenizer_check:
            # Every type carries the same tokenizer metadata: check it (and the template) once.
            tokenizer = read_tokenizer(path)
            tokenizer_check = {
                "file": path.name,
                # sentencepiece: the split llama.cpp makes from the file's scores (transformers
                # rebuilds its own Metaspace tokenizer from them, which is not what runs)
                **(spm_check or check_tokenizer(tokenizer, probes, loaded.tokenizer)),
            }
            train = split_examples(run.path, "train")
            template_check = check_template(tokenizer, train, loaded.formatter, loaded.tokenizer)
            translation = translate(
                jinja_renderer(tokenizer),
                loaded.tokenizer.bos_token or "",
                loaded.tokenizer.eos_token or "",
                vocab.add_bos,
            )
    config = merged.config
    trained_report = source.trained_report
    del merged, source
    gc.collect()

    assert translation is not None
    adapter = _adapter_gguf(run, config, folder, say)
    stops = [loaded.tokenizer.convert_ids_to_tokens(i) for i in loaded.stop_ids]
    first_file = file_name(run.path.name, types[0], base_only)
    (folder / "Modelfile").write_text(
        render_modelfile(
            gguf_file=first_file,
            translation=translation,
            stop_tokens=stops,
            chat_template=vocab.chat_template,
            header=f"Ollama Modelfile written by lorakit {__version__} for run {run.path.name}.\n"
            f"ollama create {run.path.name} -f Modelfile",
            others=[file_name(run.path.name, t, base_only) for t in types[1:]],
            adapter=adapter["file"] if base_only and adapter["written"] else None,
        ),
        encoding="utf-8",
    )
    if translation.template is None:
        say(f"warning: Modelfile has no TEMPLATE: {translation.reason} (see the comment in it)")
    if base_only and not adapter["written"]:
        say(f"warning: the base GGUF has no adapter GGUF to go with it: {adapter['reason']}")
    for line in report.lines():
        say(line)
    record = {
        **report.to_json(),
        "merge_base": merge_base_label(merge_base, loaded.recipe),
        "reader": f"transformers {transformers.__version__} (gguf_file= loader)",
        "files": files,
        "tokenizer": tokenizer_check,
        "chat_template": {**template_check, "ollama_template": translation.family},
        "stop_tokens": stops,
        "adapter_gguf": adapter,
    }
    if base_only:
        assert trained_report is not None
        record["base_only"] = True
        record["trained"] = trained_report.to_json()
    return record
