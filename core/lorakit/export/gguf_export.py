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

from lorakit.export.gguf_spm import space_prefix_for_run
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


def file_name(run_name: str, gguf_type: str, base_only: bool = False) -> str:
    return f"{run_name}{'-base' if base_only else ''}-{gguf_type.upper()}.gguf"


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
    merge: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Write and check every GGUF file into ``folder``; return the ``parity.json`` record.
    ``merge``: how the merged model is made (``merge.SharedMerge`` when ``--merge`` uses it too).

    ``base_only``: the files hold the base as trained (dequantized for a quantized run)
    instead of the merged model; each is also read back with the run's adapter attached and
    compared with the trained model."""
    from lorakit.export.gguf_adapter import export_adapter_gguf
    from lorakit.export.gguf_llama_cpp import round_trip
    from lorakit.export.gguf_parity import parsed_once
    from lorakit.export.gguf_source import base_merge_base, base_source, merged_source
    from lorakit.export.llama_cpp import find_library
    from lorakit.export.parity import build_probes

    folder.mkdir(parents=True, exist_ok=True)
    llama = find_library()  # the round trip through llama.cpp, when one is on this machine
    if llama.library is None:
        say(f"llama.cpp round trip skipped: {llama.note}")
    probes = build_probes(run.path, loaded.formatter, loaded.tokenizer)
    # Before any weights: the space prefix under which llama.cpp splits like training.
    vocab, spm_check = space_prefix_for_run(run, loaded, vocab)
    if base_only:
        merge_base = base_merge_base(loaded)
        source = base_source(run, loaded, probes, say)
    else:
        source = merged_source(run, loaded, probes, say, merge_base, merge)
    files: dict[str, Any] = {}
    llama_rows: dict[str, Any] = {}
    checks: _TokenizerChecks | None = None
    for gguf_type in types:
        path = folder / file_name(run.path.name, gguf_type, base_only)
        # the file parsed once for the model and the tokenizer read back (4.2 s -> 0.8 s for
        # SmolLM2's tokenizer)
        with parsed_once():
            files[gguf_type] = _write_and_compare(
                source,
                run,
                probes,
                path,
                gguf_type,
                vocab,
                quantizer,
                loaded.device,
                base_only,
                say,
            )
            if llama.library is not None:
                llama_rows[gguf_type] = round_trip(
                    llama.library, path, gguf_type, source.model, source.report, loaded, say
                )
            if checks is None:
                # Every type carries the same tokenizer metadata: check it (and the template) once.
                checks = _check_tokenizer(path, run, loaded, probes, vocab, spm_check)
    assert checks is not None
    report, trained_report, config = source.report, source.trained_report, source.model.config
    del source  # the merged (or base) model: freed before the adapter GGUF is written
    gc.collect()
    adapter = export_adapter_gguf(run, config, folder, say)
    stops = [loaded.tokenizer.convert_ids_to_tokens(i) for i in loaded.stop_ids]
    _write_modelfile(folder, run, types, base_only, checks, vocab, stops, adapter, say)
    for line in report.lines():
        say(line)
    record = _parity_record(
        report,
        loaded,
        merge_base,
        files,
        checks,
        stops,
        adapter,
        trained_report if base_only else None,
    )
    record["llama_cpp"] = (
        {"library": str(llama.library), "found_by": llama.note, "files": llama_rows}
        if llama.library is not None
        else {"skipped": llama.note}
    )
    return record


def _write_and_compare(
    source: Any,
    run: Any,
    probes: Any,
    path: Path,
    gguf_type: str,
    vocab: Vocab,
    quantizer: Quantizer | None,
    device: str,
    base_only: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Write one GGUF of ``source``'s model, read it back with transformers and add its row
    to ``source.report`` (refused beyond tolerance); return the file's record."""
    from lorakit import __version__
    from lorakit.export.gguf_parity import argmax_agreement, check_tolerance, read_model
    from lorakit.export.gguf_source import check_with_adapter
    from lorakit.export.parity import probe_logits

    name = run.path.name
    description = (
        f"base model of {name} as trained (lorakit {__version__}); apply "
        f"{name}-lora-F32.gguf with --lora"
        if base_only
        else f"{name}, fine-tuned with lorakit {__version__}"
    )
    info = _write_file(source.model, vocab, path, gguf_type, quantizer, name, description)
    say(f"GGUF written ({path.name}, {info['bytes'] / 2**20:.1f} MiB); reading it back")
    report = source.report
    model = read_model(path, device)
    logits = probe_logits(model, probes)
    row = report.add(
        f"gguf_{gguf_type}",
        f"GGUF {gguf_type}{' (base)' if base_only else ''}, read back by transformers",
        logits,
        file=path.name,
        argmax_agreement=argmax_agreement(report.reference, logits),
    )
    check_tolerance(row, gguf_type, report.reference, report.reference_ppl)
    if base_only:
        row["with_adapter"] = check_with_adapter(model, run, probes, source, gguf_type)
    del model
    gc.collect()
    return info


@attrs.frozen
class _TokenizerChecks:
    """The first GGUF's tokenizer and chat template checked, and the template for Ollama."""

    tokenizer: dict[str, Any]
    template: dict[str, Any]
    translation: Any  # lorakit.export.modelfile.Translation


def _check_tokenizer(
    path: Path,
    run: Any,
    loaded: Any,
    probes: Any,
    vocab: Vocab,
    spm_check: dict[str, Any] | None,
) -> _TokenizerChecks:
    """The tokenizer and chat template read back from the GGUF at ``path`` against training's,
    and the template translated for the Modelfile."""
    from lorakit.export.gguf_parity import check_template, check_tokenizer, read_tokenizer
    from lorakit.export.modelfile import jinja_renderer, jinja_tools_renderer, translate
    from lorakit.export.parity import split_examples

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
        jinja_tools_renderer(tokenizer),
    )
    return _TokenizerChecks(tokenizer_check, template_check, translation)


def _write_modelfile(
    folder: Path,
    run: Any,
    types: Sequence[str],
    base_only: bool,
    checks: _TokenizerChecks,
    vocab: Vocab,
    stops: list[str],
    adapter: dict[str, Any],
    say: Callable[[str], None],
) -> None:
    """Ollama's Modelfile for the first file (the others named in it), with what it lacks said."""
    from lorakit import __version__
    from lorakit.export.modelfile import render_modelfile

    name, translation = run.path.name, checks.translation
    (folder / "Modelfile").write_text(
        render_modelfile(
            gguf_file=file_name(name, types[0], base_only),
            translation=translation,
            stop_tokens=stops,
            chat_template=vocab.chat_template,
            header=f"Ollama Modelfile written by lorakit {__version__} for run {name}.\n"
            f"ollama create {name} -f Modelfile",
            others=[file_name(name, t, base_only) for t in types[1:]],
            adapter=adapter["file"] if base_only and adapter["written"] else None,
        ),
        encoding="utf-8",
    )
    if translation.template is None:
        say(f"warning: Modelfile has no TEMPLATE: {translation.reason} (see the comment in it)")
    if base_only and not adapter["written"]:
        say(f"warning: the base GGUF has no adapter GGUF to go with it: {adapter['reason']}")


def _parity_record(
    report: Any,
    loaded: Any,
    merge_base: str,
    files: dict[str, Any],
    checks: _TokenizerChecks,
    stops: list[str],
    adapter: dict[str, Any],
    trained_report: Any,
) -> dict[str, Any]:
    """The GGUF folder's ``parity.json``; ``trained_report``: base-only's trained model."""
    import transformers

    from lorakit.export.merge import merge_base_label

    record = {
        **report.to_json(),
        "merge_base": merge_base_label(merge_base, loaded.recipe),
        "reader": f"transformers {transformers.__version__} (gguf_file= loader)",
        "files": files,
        "tokenizer": checks.tokenizer,
        "chat_template": {**checks.template, "ollama_template": checks.translation.family},
        "stop_tokens": stops,
        "adapter_gguf": adapter,
    }
    if trained_report is not None:
        record["base_only"] = True
        record["trained"] = trained_report.to_json()
    return record
