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

import contextlib
import gc
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from lorakit import __version__
from lorakit.catalog import Catalog
from lorakit.console import say as console_say
from lorakit.diskfull import disk_full_is_an_error, is_disk_full
from lorakit.errors import RunError, cause
from lorakit.export.hygiene import follow_umask, run_at_rest
from lorakit.rundir import RunDir, write_json
from lorakit.session import Session

MARKER = "lorakit_export.json"


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
    added = _added_files(out)
    if added:
        shown = ", ".join(added[:5]) + (f" and {len(added) - 5} more" if len(added) > 5 else "")
        raise RunError(
            f"export target {out} holds files the lorakit export there did not write ({shown}); "
            "--overwrite would delete them",
            fix="move them out of the folder, or choose another folder with --out",
        )


def _added_files(out: Path) -> list[str]:
    """Files in the export folder ``out`` that its export did not write (its marker lists
    what it wrote; an export by a lorakit before that list: none known)."""
    from lorakit.rundir import read_json

    try:
        written = read_json(out / MARKER).get("files")
    except Exception:  # a damaged marker: nothing known, as before the list
        return []
    if not isinstance(written, list):
        return []
    present = _files(out)
    return sorted(set(present) - set(written) - {MARKER})


def _files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()
    )


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@attrs.frozen
class ExportOptions:
    """What ``lorakit export`` writes besides the adapter, and where (its command line)."""

    merge: bool = False
    dtype: str = "fp32"
    merge_base: str = "original"
    out: Path | None = None
    overwrite: bool = False
    gguf_types: tuple[str, ...] = ()
    gguf_base_only: bool = False


def export_run(
    run_dir: Path,
    *,
    merge: bool = False,
    dtype: str = "fp32",
    merge_base: str = "original",
    out: Path | None = None,
    overwrite: bool = False,
    gguf_types: Sequence[str] = (),
    gguf_base_only: bool = False,
    say: Callable[[str], None] = console_say,
    catalog: Catalog | None = None,
) -> ExportResult:
    """Export the adapter of ``run_dir`` (with ``merge`` a merged model, with ``gguf_types``
    merged GGUF files, or with ``gguf_base_only`` GGUF files of the base as trained); return
    the paths. A run a live ``lorakit run`` holds is refused."""
    if out is not None:
        out = Path(out).resolve()  # `--out .` has no name to put a temporary folder beside
    options = ExportOptions(
        merge, dtype, merge_base, out, overwrite, tuple(gguf_types), gguf_base_only
    )
    # `export .` names its files after the run: an absolute path has the run's name (links
    # are not followed, so a linked run folder is still refused as one)
    run_dir = Path(os.path.abspath(run_dir))
    with run_at_rest(run_dir):
        return _export_run(run_dir, options, catalog, say)


def _export_run(
    run_dir: Path, opts: ExportOptions, catalog: Catalog | None, say: Callable[[str], None]
) -> ExportResult:
    import transformers

    from lorakit.export import contents
    from lorakit.export.merge import SharedMerge
    from lorakit.modeling import check_adapter_dir

    transformers.logging.set_verbosity_error()
    session = _open_run(run_dir, catalog)
    run = RunDir(run_dir)

    # 1. The adapter must be complete and finite before anything is written.
    check_adapter_dir(run.adapter)
    out = Path(opts.out) if opts.out is not None else run_dir / "export"
    check_out_dir(out, opts.overwrite)

    # 2. The tokenizer, formatter and stop tokens exactly as training saved them; what a GGUF
    #    cannot hold (architecture, tokenizer) refused before any weights are loaded.
    loaded = _prepare_inference(session, run, say)
    meta, base_path = contents.export_meta(run, loaded, session.components)
    vocab, quantizer = contents.gguf_preflight(loaded, base_path, opts.gguf_types)
    cards = contents.card_inputs(run, meta)

    with _staging(out, opts) as tmp:
        # 3. The adapter export: byte copies of the checked weights, tokenizer, stop tokens.
        gen = contents.write_adapter(run, loaded, meta, base_path, tmp / "adapter", say)
        # 4. GGUF files of the merged model (+ the adapter alone), each read back and compared.
        #    With --merge too, the fp32 merge is made once and used by both, the GGUF files
        #    first: the merged folder then casts it to its export dtype.
        gguf = bool(opts.gguf_types) and vocab is not None
        merge = SharedMerge(uses=2 if opts.merge and gguf and not opts.gguf_base_only else 1)
        gguf_parity = None
        if gguf:
            gguf_parity = contents.write_gguf_folder(
                run,
                loaded,
                tmp / "gguf",
                vocab,
                quantizer,
                cards,
                opts.gguf_types,
                opts.merge_base,
                opts.gguf_base_only,
                say,
                merge,
            )
        # 5. The merged model, merged in fp32 (on the original or the dequantized base), with
        #    parity numbers.
        parity: dict[str, Any] | None = None
        merge_info: dict[str, Any] | None = None
        if opts.merge:
            parity, merge_info = contents.write_merged_folder(
                run, loaded, meta, gen, tmp, opts.dtype, opts.merge_base, say, merge
            )
        # 6. Model cards and the export marker, then move the finished export into place.
        contents.write_cards(tmp, cards, parity, merge_info)
        _publish_export(tmp, out, run_dir, opts)
    return ExportResult(
        out=out,
        adapter=out / "adapter",
        merged=out / "merged" if opts.merge else None,
        parity=parity,
        gguf=out / "gguf" if opts.gguf_types else None,
        gguf_parity=gguf_parity,
    )


def _open_run(run_dir: Path, catalog: Catalog | None) -> Session:
    """The run's recipe and plugins, as it trained (a run folder only, never a recipe file)."""
    from lorakit.load_run import run_folder
    from lorakit.session import open_session

    run_folder(run_dir, recipe_too=False)  # a recipe file or a missing folder
    return open_session(run_dir, runs=True, catalog=catalog)


def _prepare_inference(session: Session, run: RunDir, say: Callable[[str], None]) -> Any:
    """The tokenizer, formatter and stop tokens the adapter was saved with (a ``Loaded``)."""
    from lorakit.load_run import prepare_inference

    loaded = prepare_inference(session.recipe, session.components, run.adapter)
    if not getattr(loaded.tokenizer, "chat_template", None):
        say(
            "warning: the tokenizer has no chat template; the export renders prompts only via lorakit"
        )
    return loaded


@contextlib.contextmanager
def _staging(out: Path, opts: ExportOptions) -> Iterator[Path]:
    """A temporary sibling of ``out`` to build the export in, removed unless published; a full
    disk is one clear error, and so is a parent folder that cannot be made. Staging folders an
    earlier export left (killed before it could clean up) are removed first."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(
            f"cannot make the folder {out.parent} for the export ({cause(exc)})",
            where="--out",
            fix="choose --out inside a folder you can write to",
        ) from exc
    _remove_stale_staging(out)
    had_export = out.exists()
    with disk_full_is_an_error(
        out,
        "the GGUF export" if opts.gguf_types else "the export",
        "nothing was exported: the unfinished export folder was removed"
        + (f" and the earlier export in {out} is unchanged" if had_export else "")
        + "; the run folder is unchanged",
        fix="free some space (or export elsewhere with --out DIR) and run the same command again",
    ):
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        except OSError as exc:
            if is_disk_full(exc):
                raise
            raise RunError(
                f"cannot write in {out.parent} for the export ({cause(exc)})",
                where="--out",
                fix="choose --out inside a folder you can write to",
            ) from exc
        try:
            yield tmp
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            gc.collect()


def _remove_stale_staging(out: Path) -> None:
    """Remove the staging folders (``.NAME.tmp-PID-*``) and replaced exports
    (``.NAME.old-PID``) of exports to ``out`` whose process is gone: killed before they could
    clean up, they would otherwise stay for good beside the export, as large as it. A folder
    of a process still running (another export to the same folder) is left alone."""
    prefix = f".{out.name}."
    for stale in out.parent.iterdir():
        if not stale.name.startswith(prefix):  # not a glob: the name may hold [ or *
            continue
        kind, _, rest = stale.name[len(prefix) :].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _publish_export(tmp: Path, out: Path, run_dir: Path, opts: ExportOptions) -> None:
    """Mark ``tmp`` as a lorakit export, give it the umask's modes, and move it to ``out``."""
    write_json(
        tmp / MARKER,
        {
            "lorakit_version": __version__,
            "run": str(run_dir.resolve()),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "merged": opts.merge,
            "dtype": opts.dtype if opts.merge else None,
            "gguf": list(opts.gguf_types),
            "gguf_base_only": opts.gguf_base_only,
            # what this export wrote: --overwrite refuses to delete anything else
            "files": _files(tmp),
        },
    )
    follow_umask(tmp)  # mkdtemp made it 0700: readable as the user's umask says
    _publish(tmp, out)
