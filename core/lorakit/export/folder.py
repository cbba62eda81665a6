"""Export a finished run: the adapter always, a merged model with ``--merge``, parity, cards.

Layout of the export folder (``RUN_DIR/export/`` unless ``--out``)::

    adapter/            adapter_config.json, adapter_model.safetensors, tokenizer + chat
                        template, generation_config.json (eos includes the end-of-turn), README.md
    merged/             (--merge) config.json, model*.safetensors, tokenizer + chat template,
                        generation_config.json, lorakit.json, README.md
    parity.json         (--merge) merged vs base + adapter, quantized base + adapter vs both
    gguf/               (--gguf) <run>-<TYPE>.gguf (--base-only: <run>-base-<TYPE>.gguf, the base
                        as trained), adapter GGUF, Modelfile, parity.json, README.md
    lorakit_export.json marks the folder as a lorakit export (only those are ever replaced)

The export is built in a temporary sibling folder and moved into place when complete, so a
failed or killed export never leaves a half-written folder where a good one was.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from lorakit import __version__
from lorakit.catalog import Catalog
from lorakit.console import say as console_say
from lorakit.contracts import HasSystemPrompt
from lorakit.diskfull import disk_full_is_an_error
from lorakit.errors import LorakitError, RunError
from lorakit.export.adapter_io import META, read_meta
from lorakit.export.hygiene import follow_umask, run_at_rest
from lorakit.rundir import RunDir, read_json, write_json

MARKER = "lorakit_export.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@attrs.frozen
class ExportResult:
    out: Path
    adapter: Path
    merged: Path | None
    parity: dict[str, Any] | None
    gguf: Path | None = None
    gguf_parity: dict[str, Any] | None = None


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to touch a non-empty folder unless it is a lorakit export and ``overwrite`` is set."""
    if not out.exists():
        return
    if not out.is_dir():
        raise RunError(
            f"export target {out} exists and is not a folder", fix="choose another --out"
        )
    if not any(out.iterdir()):
        return
    if not (out / MARKER).is_file():
        raise RunError(
            f"export target {out} is not empty and is not a lorakit export",
            fix="choose a new or empty folder with --out (lorakit never replaces folders it did not write)",
        )
    if not overwrite:
        raise RunError(
            f"export target {out} already holds a lorakit export",
            fix="pass --overwrite to replace it (the new export is swapped in only once complete), "
            "or choose another folder with --out",
        )


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _last_eval(run: RunDir) -> dict[str, Any] | None:
    import json

    if not run.metrics.is_file():
        return None
    last = None
    for line in run.metrics.read_text(encoding="utf-8").splitlines():
        if '"eval_loss"' in line:
            last = json.loads(line)
    return last


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


def export_run(
    run_dir: Path,
    catalog: Catalog,
    *,
    merge: bool = False,
    dtype: str = "fp32",
    merge_base: str = "original",
    out: Path | None = None,
    overwrite: bool = False,
    gguf_types: Sequence[str] = (),
    gguf_base_only: bool = False,
    say: Callable[[str], None] = console_say,
) -> ExportResult:
    """Export the adapter of ``run_dir`` (with ``merge`` a merged model, with ``gguf_types``
    merged GGUF files, or with ``gguf_base_only`` GGUF files of the base as trained); return
    the paths. A run a live ``lorakit run`` holds is refused."""
    with run_at_rest(Path(run_dir)):
        return _export_run(
            Path(run_dir),
            catalog,
            merge=merge,
            dtype=dtype,
            merge_base=merge_base,
            out=out,
            overwrite=overwrite,
            gguf_types=gguf_types,
            gguf_base_only=gguf_base_only,
            say=say,
        )


def _export_run(
    run_dir: Path,
    catalog: Catalog,
    *,
    merge: bool,
    dtype: str,
    merge_base: str,
    out: Path | None,
    overwrite: bool,
    gguf_types: Sequence[str],
    gguf_base_only: bool,
    say: Callable[[str], None],
) -> ExportResult:
    import transformers

    from lorakit.components import build_components
    from lorakit.export.model_card import render_card
    from lorakit.load_run import open_run, prepare_inference
    from lorakit.modeling import check_adapter_dir

    transformers.logging.set_verbosity_error()
    recipe = open_run(run_dir, catalog)
    components = build_components(recipe, catalog)
    run = RunDir(run_dir)

    # 1. The adapter must be complete and finite before anything is written.
    check_adapter_dir(run.adapter)
    out = Path(out) if out is not None else run_dir / "export"
    check_out_dir(out, overwrite)

    # 2. The tokenizer, formatter and stop tokens exactly as training saved them.
    loaded = prepare_inference(recipe, components, run.adapter)
    tok = loaded.tokenizer
    if not getattr(tok, "chat_template", None):
        say(
            "warning: the tokenizer has no chat template; the export renders prompts only via lorakit"
        )
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
    base_path = meta.get("base_model_path") or loaded.ref.path
    meta.setdefault("base_model_path", base_path)
    vocab = quantizer = None
    if gguf_types:
        # Refuse what a GGUF cannot hold (architecture, tokenizer) before loading any weights.
        from lorakit.export.gguf_export import preflight, preflight_types

        quantizer = preflight_types(gguf_types)  # a K-quant without llama.cpp: refused now
        vocab = preflight(loaded, base_path)
    card_inputs: dict[str, Any] = {
        "meta": meta,
        "recipe_text": run.recipe.read_text(encoding="utf-8"),
        "data_report": read_json(run.data_report) if run.data_report.is_file() else None,
        "eval_report": read_json(run.path / "eval_report.json")
        if (run.path / "eval_report.json").is_file()
        else None,
        "last_eval": _last_eval(run),
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    had_export = out.exists()
    with disk_full_is_an_error(
        out,
        "the GGUF export" if gguf_types else "the export",
        "nothing was exported: the unfinished export folder was removed"
        + (f" and the earlier export in {out} is unchanged" if had_export else "")
        + "; the run folder is unchanged",
        fix="free some space (or export elsewhere with --out DIR) and run the same command again",
    ):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            # 3. The adapter export: byte copies of the checked weights, tokenizer, stop tokens.
            adapter_out = tmp / "adapter"
            adapter_out.mkdir()
            for name in ADAPTER_FILES:
                shutil.copy2(run.adapter / name, adapter_out / name)
            tok.save_pretrained(str(adapter_out))
            gen = _generation_config(
                [run.adapter, Path(base_path)], loaded.stop_ids, tok.pad_token_id
            )
            gen.save_pretrained(str(adapter_out))
            write_json(adapter_out / META, meta)
            say(
                f"adapter export written ({', '.join(ADAPTER_FILES)} + tokenizer + generation_config)"
            )

            # 4. The merged model, merged in fp32 (on the original or the dequantized base), with
            #    parity numbers.
            parity = None
            merge_info = None
            if merge:
                from lorakit.export.merge import merge_base_label, write_merged

                merge_info = {"merge_base": merge_base_label(merge_base, recipe), "dtype": dtype}
                parity = write_merged(run, loaded, tmp / "merged", dtype, gen, say, merge_base)
                write_json(tmp / "merged" / META, {**meta, **merge_info})
                write_json(tmp / "parity.json", parity)

            # 5. GGUF files of the merged model (+ the adapter alone), each read back and compared.
            gguf_parity = None
            if gguf_types and vocab is not None:
                from lorakit.export.gguf_export import write_gguf_export

                gguf_parity = write_gguf_export(
                    run,
                    loaded,
                    tmp / "gguf",
                    gguf_types,
                    vocab,
                    say,
                    merge_base,
                    gguf_base_only,
                    quantizer,
                )
                write_json(tmp / "gguf" / "parity.json", gguf_parity)
                (tmp / "gguf" / "README.md").write_text(
                    render_card(kind="gguf", parity=gguf_parity, merge_info=None, **card_inputs),
                    encoding="utf-8",
                )

            # 6. Model cards and the export marker, then move the finished export into place.
            (adapter_out / "README.md").write_text(
                render_card(kind="adapter", parity=parity, merge_info=None, **card_inputs),
                encoding="utf-8",
            )
            if merge:
                (tmp / "merged" / "README.md").write_text(
                    render_card(kind="merged", parity=parity, merge_info=merge_info, **card_inputs),
                    encoding="utf-8",
                )
            write_json(
                tmp / MARKER,
                {
                    "lorakit_version": __version__,
                    "run": str(run_dir.resolve()),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "merged": merge,
                    "dtype": dtype if merge else None,
                    "gguf": list(gguf_types),
                    "gguf_base_only": gguf_base_only,
                },
            )
            follow_umask(tmp)  # mkdtemp made it 0700: readable as the user's umask says
            _publish(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            gc.collect()
    return ExportResult(
        out=out,
        adapter=out / "adapter",
        merged=out / "merged" if merge else None,
        parity=parity,
        gguf=out / "gguf" if gguf_types else None,
        gguf_parity=gguf_parity,
    )
