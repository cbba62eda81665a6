"""What goes into a run's export folder (:mod:`lorakit.export.folder` builds and publishes it):
the exported metadata, the adapter folder, the merged model, the GGUF folder, the model cards.

Each function writes one part into the temporary export folder and returns what a later part
needs (the generation config, the parity records).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lorakit.components import Components
from lorakit.contracts import HasSystemPrompt
from lorakit.errors import LorakitError
from lorakit.export.adapter_io import META, read_meta
from lorakit.rundir import RunDir, metric_records, read_json, write_json

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _last_eval(run: RunDir) -> dict[str, Any] | None:
    if not run.metrics.is_file():
        return None
    evals = [r for r in metric_records(run.metrics) if "eval_loss" in r]
    return evals[-1] if evals else None


def _hub_id(loaded: Any) -> str:
    """The base's Hub id for the model cards' ``base_model`` ("" for a local folder, or when the
    model source cannot be resolved here: an adapter-only export does not need the base)."""
    try:
        return str(loaded.ref.hub_id)
    except LorakitError:
        return ""


def _generation_config(source_dirs: list[Path], stop_ids: list[int], pad_id: int | None) -> Any:
    from transformers import GenerationConfig

    gen = GenerationConfig()
    for folder in source_dirs:
        if (folder / "generation_config.json").is_file():
            gen = GenerationConfig.from_pretrained(str(folder))
            break
    gen.eos_token_id = list(stop_ids)
    gen.pad_token_id = pad_id
    return gen


def export_meta(run: RunDir, loaded: Any, components: Components) -> tuple[dict[str, Any], str]:
    """The adapter's ``lorakit.json`` as exported (end of turn, quantized, base model, system
    prompt) and the base model's folder."""
    meta = {
        **read_meta(run.adapter),
        "end_of_turn": loaded.end_of_turn,
        # the backend says whether it quantizes (the model card tags qlora); never its name
        "quantized": components.quant.quantizes,
        "base_model_id": _hub_id(loaded),
    }
    formatter = loaded.formatter
    if isinstance(formatter, HasSystemPrompt) and formatter.system_prompt is not None:
        meta["system_prompt"] = formatter.system_prompt
    # the base as resolved on this machine: the path recorded at training is the training
    # machine's (another user's cache, another mount), kept only where nothing resolves here
    base_path = str(loaded.ref.path or meta.get("base_model_path") or "")
    meta["base_model_path"] = base_path
    return meta, base_path


def gguf_preflight(loaded: Any, base_path: str, gguf_types: Sequence[str]) -> tuple[Any, Any]:
    """(vocab, K-quant quantizer) for ``--gguf``, refused now if a GGUF cannot hold the model
    or a K-quant has no llama.cpp; (None, None) without ``--gguf``."""
    if not gguf_types:
        return None, None
    from lorakit.export.gguf_export import preflight, preflight_types

    quantizer = preflight_types(gguf_types)  # a K-quant without llama.cpp: refused now
    return preflight(loaded, base_path), quantizer


def card_inputs(run: RunDir, meta: dict[str, Any]) -> dict[str, Any]:
    """What every model card of the export is rendered from (the run's recipe and reports)."""
    eval_report = run.path / "eval_report.json"
    return {
        "meta": meta,
        "recipe_text": run.recipe.read_text(encoding="utf-8"),
        "data_report": read_json(run.data_report) if run.data_report.is_file() else None,
        "eval_report": read_json(eval_report) if eval_report.is_file() else None,
        "last_eval": _last_eval(run),
    }


def write_adapter(
    run: RunDir,
    loaded: Any,
    meta: dict[str, Any],
    base_path: str,
    adapter_out: Path,
    say: Callable[[str], None],
) -> Any:
    """The adapter folder: weights, tokenizer, stop tokens, metadata; return the generation
    config (the merged model gets the same)."""
    adapter_out.mkdir()
    for name in ADAPTER_FILES:
        shutil.copy2(run.adapter / name, adapter_out / name)
    tok = loaded.tokenizer
    tok.save_pretrained(str(adapter_out))
    gen = _generation_config([run.adapter, Path(base_path)], loaded.stop_ids, tok.pad_token_id)
    gen.save_pretrained(str(adapter_out))
    write_json(adapter_out / META, meta)
    say(f"adapter export written ({', '.join(ADAPTER_FILES)} + tokenizer + generation_config)")
    return gen


def write_merged_folder(
    run: RunDir,
    loaded: Any,
    meta: dict[str, Any],
    gen: Any,
    tmp: Path,
    dtype: str,
    merge_base: str,
    say: Callable[[str], None],
    merge: Callable[..., Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``merged/`` and ``parity.json``; return the parity record and the merge's settings."""
    from lorakit.export.merge import merge_base_label, merge_fp32, write_merged

    merge_info = {"merge_base": merge_base_label(merge_base, loaded.recipe), "dtype": dtype}
    parity = write_merged(
        run, loaded, tmp / "merged", dtype, gen, say, merge_base, merge or merge_fp32
    )
    write_json(tmp / "merged" / META, {**meta, **merge_info})
    write_json(tmp / "parity.json", parity)
    return parity, merge_info


def write_gguf_folder(
    run: RunDir,
    loaded: Any,
    folder: Path,
    vocab: Any,
    quantizer: Any,
    cards: dict[str, Any],
    types: Sequence[str],
    merge_base: str,
    base_only: bool,
    say: Callable[[str], None],
    merge: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """``gguf/``: the files, their ``parity.json`` and model card; return the parity record."""
    from lorakit.export.gguf_export import write_gguf_export
    from lorakit.export.model_card import render_card

    gguf_parity = write_gguf_export(
        run,
        loaded,
        folder,
        types,
        vocab,
        say,
        merge_base,
        base_only,
        quantizer,
        merge,
    )
    write_json(folder / "parity.json", gguf_parity)
    (folder / "README.md").write_text(
        render_card(kind="gguf", parity=gguf_parity, merge_info=None, **cards), encoding="utf-8"
    )
    return gguf_parity


def write_cards(
    tmp: Path,
    cards: dict[str, Any],
    parity: dict[str, Any] | None,
    merge_info: dict[str, Any] | None,
) -> None:
    """The adapter's model card, and the merged model's when there is one."""
    from lorakit.export.model_card import render_card

    (tmp / "adapter" / "README.md").write_text(
        render_card(kind="adapter", parity=parity, merge_info=None, **cards), encoding="utf-8"
    )
    if merge_info is not None:
        (tmp / "merged" / "README.md").write_text(
            render_card(kind="merged", parity=parity, merge_info=merge_info, **cards),
            encoding="utf-8",
        )
