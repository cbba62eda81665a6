"""Run an exported GGUF through llama.cpp itself (``libllama``, through ctypes, in a child process).

The library is found like the quantizer's (``llama_quantize``), in this order:

1. ``LORAKIT_LLAMA_CPP``: a ``libllama*.so`` file or a folder holding one;
2. ``LORAKIT_LLAMA_QUANTIZE`` when it names a library or a folder holding one;
3. ``llama-quantize`` on ``PATH``: a ``libllama*.so`` next to it or in ``../lib``.

The child process (``python -m lorakit.export.llama_cpp REQUEST OUT``) loads the file with
``llama_model_load_from_file``, tokenizes texts with the file's own vocabulary, computes the
logits of every position of given token ids (``llama_decode``, ``llama_get_logits_ith``) and
decodes greedily from given prompts; it writes ``result.json`` and ``logits.npz`` into OUT. A
crash inside llama.cpp cannot take the export down.

Struct layouts (llama.h of the ``@node-llama-cpp/linux-x64`` 3.22.1 build, and of llama.cpp
for two years before it): ``llama_batch`` is written out in full, it has not changed. The
parameter structs ``llama_model_params`` and ``llama_context_params`` grow between releases, so
they are kept opaque, filled by llama.cpp's own ``*_default_params()`` and passed back as they
came; only the context's first four fields (``n_ctx``, ``n_batch``, ``n_ubatch``,
``n_seq_max``, unchanged since they were introduced) are set. Both are larger than 16 bytes,
so the x86-64 and arm64 calling conventions pass them through memory: a buffer larger than
the real struct is harmless, the callee reads only its own size.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs

ENV = "LORAKIT_LLAMA_CPP"
QUANTIZE_ENV = "LORAKIT_LLAMA_QUANTIZE"


def _library_in(folder: Path) -> Path | None:
    # libllama.so, libllama.so.0, libllama.v0.5.0.so; not libllama-common.so and the like
    libs = sorted(p for p in folder.glob("libllama*.so*") if "-" not in p.name)
    return libs[0] if libs else None


def _library_at(configured: str) -> Path | None:
    path = Path(configured).expanduser()
    if path.is_dir():
        return _library_in(path)
    return path if path.is_file() and ".so" in path.name else None


@attrs.frozen
class Found:
    library: Path | None
    note: str  # where it came from, or why there is none


def find_library() -> Found:
    """llama.cpp's ``libllama`` for the round trip, or ``None`` with the reason."""
    configured = os.environ.get(ENV)
    if configured:
        lib = _library_at(configured)
        if lib is None:
            return Found(
                None, f"{ENV}={configured} is neither a libllama library nor a folder holding one"
            )
        return Found(lib, f"{ENV}")
    quantize = os.environ.get(QUANTIZE_ENV)
    if quantize and (lib := _library_at(quantize)) is not None:
        return Found(lib, f"{QUANTIZE_ENV}")
    exe = shutil.which("llama-quantize")
    if exe:
        bin_dir = Path(exe).resolve().parent
        for folder in (bin_dir, bin_dir.parent / "lib"):
            if (lib := _library_in(folder)) is not None:
                return Found(lib, "next to llama-quantize on PATH")
    return Found(
        None,
        f"no llama.cpp library found (set {ENV} to a libllama*.so or its folder, e.g. the "
        "bins/linux-x64 folder of the npm package @node-llama-cpp/linux-x64@3.22.1)",
    )


@attrs.frozen
class Request:
    """What the child computes: token ids of ``texts``, logits of every position of each of
    ``sequences``, and ``n_generate`` greedy tokens after each of ``prompts`` (token ids)."""

    texts: list[str]
    sequences: list[list[int]]
    prompts: list[list[int]]
    n_generate: int


@attrs.frozen
class Result:
    token_ids: list[list[int]]  # llama.cpp's tokenization of each text
    logits: list[Any]  # numpy float32 [len(seq), n_vocab] per sequence
    generations: list[list[int]]  # greedy tokens after each prompt (stopping at end of generation)
    prompt_logits: list[Any]  # numpy float32 [n_vocab]: the next-token logits after each prompt
    system: str  # llama_print_system_info


def run(library: Path, gguf: Path, request: Request, timeout: float = 900) -> Result:
    """Run ``request`` on ``gguf`` with llama.cpp in a child process; ``RuntimeError`` with the
    tail of llama.cpp's output when it fails."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="lorakit-llama-cpp-") as tmp:
        out = Path(tmp)
        (out / "request.json").write_text(json.dumps(attrs.asdict(request)), encoding="utf-8")
        cmd = [sys.executable, "-m", __name__, str(library), str(gguf), str(out)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"llama.cpp ({library}) ran past {timeout:g} s") from exc
        if done.returncode != 0 or not (out / "result.json").is_file():
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
            raise RuntimeError(f"llama.cpp ({library}) failed, exit {done.returncode}: {tail}")
        result = json.loads((out / "result.json").read_text(encoding="utf-8"))
        with np.load(out / "logits.npz") as arrays:
            logits = [arrays[f"seq{i}"] for i in range(len(request.sequences))]
            prompt_logits = [arrays[f"prompt{i}"] for i in range(len(request.prompts))]
    return Result(
        token_ids=result["token_ids"],
        logits=logits,
        generations=result["generations"],
        prompt_logits=prompt_logits,
        system=result["system"],
    )


# ---- the child process: libllama through ctypes -------------------------------------------


def _child(library: str, gguf: str, out: str) -> int:
    import ctypes as C

    import numpy as np

    request = json.loads((Path(out) / "request.json").read_text(encoding="utf-8"))

    class Batch(C.Structure):
        _fields_ = [
            ("n_tokens", C.c_int32),
            ("token", C.POINTER(C.c_int32)),
            ("embd", C.POINTER(C.c_float)),
            ("pos", C.POINTER(C.c_int32)),
            ("n_seq_id", C.POINTER(C.c_int32)),
            ("seq_id", C.POINTER(C.POINTER(C.c_int32))),
            ("logits", C.POINTER(C.c_int8)),
        ]

    class ModelParams(C.Structure):  # opaque (see the module docstring)
        _fields_ = [("opaque", C.c_uint64 * 64)]

    class ContextParams(C.Structure):
        _fields_ = [
            ("n_ctx", C.c_uint32),
            ("n_batch", C.c_uint32),
            ("n_ubatch", C.c_uint32),
            ("n_seq_max", C.c_uint32),
            ("opaque", C.c_uint64 * 64),
        ]

    lib = C.CDLL(library)  # finds its libggml* next to it (RUNPATH $ORIGIN)
    ptr = C.c_void_p
    lib.llama_model_default_params.restype = ModelParams
    lib.llama_context_default_params.restype = ContextParams
    lib.llama_model_load_from_file.argtypes = [C.c_char_p, ModelParams]
    lib.llama_model_load_from_file.restype = ptr
    lib.llama_init_from_model.argtypes = [ptr, ContextParams]
    lib.llama_init_from_model.restype = ptr
    lib.llama_model_get_vocab.argtypes = [ptr]
    lib.llama_model_get_vocab.restype = ptr
    lib.llama_vocab_n_tokens.argtypes = [ptr]
    lib.llama_vocab_is_eog.argtypes = [ptr, C.c_int32]
    lib.llama_vocab_is_eog.restype = C.c_bool
    lib.llama_tokenize.argtypes = [
        ptr,
        C.c_char_p,
        C.c_int32,
        C.POINTER(C.c_int32),
        C.c_int32,
        C.c_bool,
        C.c_bool,
    ]
    lib.llama_batch_init.argtypes = [C.c_int32, C.c_int32, C.c_int32]
    lib.llama_batch_init.restype = Batch
    lib.llama_batch_free.argtypes = [Batch]
    lib.llama_decode.argtypes = [ptr, Batch]
    lib.llama_get_logits_ith.argtypes = [ptr, C.c_int32]
    lib.llama_get_logits_ith.restype = C.POINTER(C.c_float)
    lib.llama_get_memory.argtypes = [ptr]
    lib.llama_get_memory.restype = ptr
    lib.llama_memory_clear.argtypes = [ptr, C.c_bool]
    lib.llama_set_n_threads.argtypes = [ptr, C.c_int32, C.c_int32]
    lib.llama_print_system_info.restype = C.c_char_p
    lib.llama_model_free.argtypes = [ptr]
    lib.llama_free.argtypes = [ptr]

    # A build with dynamically loaded backends (the npm package's) has its CPU backends as
    # libggml-cpu-*.so next to the library; one built with them linked in ignores this.
    load_all = getattr(lib, "ggml_backend_load_all_from_path", None)
    if load_all is not None:
        load_all.argtypes = [C.c_char_p]
        load_all(str(Path(library).parent).encode())
    lib.llama_backend_init()

    model = lib.llama_model_load_from_file(gguf.encode(), lib.llama_model_default_params())
    if not model:
        print(f"llama_model_load_from_file could not load {gguf}", file=sys.stderr)
        return 3
    longest = max(
        [len(s) for s in request["sequences"]]
        + [len(p) + request["n_generate"] for p in request["prompts"]]
        + [1]
    )
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = max(64, longest + 8)
    cparams.n_seq_max = 1
    ctx = lib.llama_init_from_model(model, cparams)
    if not ctx:
        print("llama_init_from_model failed", file=sys.stderr)
        return 3
    threads = max(1, min(8, len(os.sched_getaffinity(0))))
    lib.llama_set_n_threads(ctx, threads, threads)
    vocab = lib.llama_model_get_vocab(model)
    n_vocab = lib.llama_vocab_n_tokens(vocab)
    batch = lib.llama_batch_init(cparams.n_batch, 0, 1)

    def decode(ids: list[int], start: int, all_logits: bool) -> None:
        for i, token in enumerate(ids):
            batch.token[i] = token
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if all_logits or i == len(ids) - 1 else 0
        batch.n_tokens = len(ids)
        code = lib.llama_decode(ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def logits_at(i: int) -> Any:
        return np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()

    def fresh() -> None:
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)

    token_ids = []
    for text in request["texts"]:
        raw = text.encode("utf-8")
        buf = (C.c_int32 * (len(raw) + 8))()
        n = lib.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, True)
        token_ids.append(list(buf[:n]) if n >= 0 else None)
    arrays: dict[str, Any] = {}
    for k, ids in enumerate(request["sequences"]):
        fresh()
        decode(ids, 0, True)
        arrays[f"seq{k}"] = np.stack([logits_at(i) for i in range(len(ids))])
    generations = []
    for k, prompt in enumerate(request["prompts"]):
        fresh()
        decode(prompt, 0, False)
        arrays[f"prompt{k}"] = logits = logits_at(-1)
        out_ids: list[int] = []
        while len(out_ids) < request["n_generate"]:
            token = int(logits.argmax())
            out_ids.append(token)
            if lib.llama_vocab_is_eog(vocab, token):
                break
            decode([token], len(prompt) + len(out_ids) - 1, False)
            logits = logits_at(-1)
        generations.append(out_ids)
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    lib.llama_model_free(model)
    np.savez(Path(out) / "logits.npz", **arrays)
    result = {
        "token_ids": token_ids,
        "generations": generations,
        "system": (lib.llama_print_system_info() or b"").decode(errors="replace").strip(),
    }
    (Path(out) / "result.json").write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2], sys.argv[3]))
