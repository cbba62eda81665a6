"""``lorakit export --gguf``: merged GGUF files, an Ollama Modelfile, an adapter GGUF, parity.

Writes into the export's ``gguf/`` folder::

    <run>-<TYPE>.gguf     the merged model per --gguf-type, tokenizer + chat template + stop ids
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


def preflight(loaded: Any, base_path: str) -> Vocab:
    """Refuse an architecture or tokenizer GGUF export cannot represent; no weights loaded."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_path)
    check_layout(config)
    return read_vocab(loaded.tokenizer, config.vocab_size, loaded.end_of_turn)


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


def file_name(run_name: str, gguf_type: str) -> str:
    return f"{run_name}-{gguf_type.upper()}.gguf"


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
) -> dict[str, Any]:
    """Write and check every GGUF file into ``folder``; return the ``parity.json`` record."""
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
    from lorakit.export.merge import _check_tolerance, merge_base_label, merge_fp32
    from lorakit.export.modelfile import jinja_renderer, render_modelfile, translate
    from lorakit.export.parity import ParityReport, build_probes, probe_logits, split_examples

    folder.mkdir(parents=True, exist_ok=True)
    probes = build_probes(run.path, loaded.formatter, loaded.tokenizer)
    spm_check = None
    if vocab.model == "llama":
        # Before any weights: the space prefix under which llama.cpp splits like training.
        prefix, spm_check = choose_space_prefix(vocab, _probe_texts(run, loaded), loaded.tokenizer)
        vocab = attrs.evolve(vocab, add_space_prefix=prefix)
    merged, first, unmerged = merge_fp32(run, loaded, probes, say, merge_base)
    reference = probe_logits(merged, probes)
    report = ParityReport(probes, reference, "merged fp32 model (transformers, in memory)")
    row = report.add(
        "unmerged", first.rows.get("unmerged", {}).get("model", first.reference_label), unmerged
    )
    _check_tolerance(row, reference, unmerged)

    files: dict[str, Any] = {}
    template_check: dict[str, Any] = {}
    tokenizer_check: dict[str, Any] = {}
    translation = None
    for gguf_type in types:
        path = folder / file_name(run.path.name, gguf_type)
        description = f"{run.path.name}, fine-tuned with lorakit {__version__}"
        files[gguf_type] = write_gguf(
            merged, vocab, path, gguf_type, name=run.path.name, description=description
        )
        say(
            f"GGUF written ({path.name}, {files[gguf_type]['bytes'] / 2**20:.1f} MiB); reading it back"
        )
        model = read_model(path, loaded.device)
        logits = probe_logits(model, probes)
        del model
        gc.collect()
        row = report.add(
            f"gguf_{gguf_type}",
            f"GGUF {gguf_type}, read back by transformers",
            logits,
            file=path.name,
            argmax_agreement=argmax_agreement(reference, logits),
        )
        check_tolerance(row, gguf_type, reference, report.reference_ppl)
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
    del merged
    gc.collect()

    assert translation is not None
    stops = [loaded.tokenizer.convert_ids_to_tokens(i) for i in loaded.stop_ids]
    first_file = file_name(run.path.name, types[0])
    (folder / "Modelfile").write_text(
        render_modelfile(
            gguf_file=first_file,
            translation=translation,
            stop_tokens=stops,
            chat_template=vocab.chat_template,
            header=f"Ollama Modelfile written by lorakit {__version__} for run {run.path.name}.\n"
            f"ollama create {run.path.name} -f Modelfile",
            others=[file_name(run.path.name, t) for t in types[1:]],
        ),
        encoding="utf-8",
    )
    if translation.template is None:
        say(f"warning: Modelfile has no TEMPLATE: {translation.reason} (see the comment in it)")
    adapter = _adapter_gguf(run, config, folder, say)
    for line in report.lines():
        say(line)
    return {
        **report.to_json(),
        "merge_base": merge_base_label(merge_base, loaded.recipe),
        "reader": f"transformers {transformers.__version__} (gguf_file= loader)",
        "files": files,
        "tokenizer": tokenizer_check,
        "chat_template": {**template_check, "ollama_template": translation.family},
        "stop_tokens": stops,
        "adapter_gguf": adapter,
    }
