"""K-quants (``q4_k_m``, ``q5_k_m``, ``q6_k``) through llama.cpp's own quantizer.

The ``gguf`` Python package cannot make K-quants; llama.cpp's ``llama_model_quantize`` can.
lorakit writes the f32 GGUF itself, then has llama.cpp quantize it, found in this order:

1. ``LORAKIT_LLAMA_QUANTIZE``: a ``llama-quantize`` executable, a ``libllama*.so`` file, or a
   folder holding one of them;
2. ``llama-quantize`` on ``PATH`` (a llama.cpp build or package).

A library is driven through its C API (``llama_model_quantize``) in a child process, so a crash
inside it cannot take the export down. The prebuilt library of the npm package
``@node-llama-cpp/linux-x64`` works (see ``INSTALL``); nothing is downloaded by lorakit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import attrs

from lorakit.errors import RunError

ENV = "LORAKIT_LLAMA_QUANTIZE"
# llama.cpp's llama_ftype values and the names llama-quantize takes
K_QUANTS = {"q4_k_m": (15, "Q4_K_M"), "q5_k_m": (17, "Q5_K_M"), "q6_k": (18, "Q6_K")}
INSTALL = (
    "npm install --prefix ~/.lorakit/llama-cpp @node-llama-cpp/linux-x64@3.22.1 && "
    f"export {ENV}=~/.lorakit/llama-cpp/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64 "
    "(or put a llama.cpp build's llama-quantize on PATH)"
)


@attrs.frozen
class Quantizer:
    path: Path
    kind: str  # "executable" or "library"

    def describe(self) -> str:
        return f"llama.cpp {self.kind} {self.path}"


def _in_folder(folder: Path) -> Path | None:
    exe = folder / "llama-quantize"
    if exe.is_file() and os.access(exe, os.X_OK):
        return exe
    # libllama.so, libllama.so.0, libllama.v0.5.0.so; not libllama-common.so and the like
    libs = sorted(p for p in folder.glob("libllama*.so*") if "-" not in p.name)
    return libs[0] if libs else None


def find_quantizer() -> Quantizer:
    """The llama.cpp quantizer to use, or ``RunError`` with the install line."""
    configured = os.environ.get(ENV)
    if configured:
        path = Path(configured).expanduser()
        found = _in_folder(path) if path.is_dir() else path if path.is_file() else None
        if found is None:
            raise RunError(
                f"{ENV}={configured} is neither a llama-quantize executable, a libllama "
                "library, nor a folder holding one",
                fix=f"point {ENV} at one, or install one: {INSTALL}",
            )
        kind = "library" if ".so" in found.name else "executable"
        if kind == "executable" and not os.access(found, os.X_OK):
            raise RunError(
                f"{ENV}={configured}: {found} is not executable",
                fix=f"chmod +x it, or point {ENV} at a working llama-quantize: {INSTALL}",
            )
        return Quantizer(found, kind)
    exe = shutil.which("llama-quantize")
    if exe:
        return Quantizer(Path(exe), "executable")
    raise RunError(
        "K-quant GGUF types (q4_k_m, q5_k_m, q6_k) need llama.cpp's quantizer, and none was "
        f"found (no {ENV}, no llama-quantize on PATH)",
        fix=f"install one: {INSTALL}; or export f16/q8_0, which lorakit writes itself",
    )


def quantize(quantizer: Quantizer, source: Path, target: Path, gguf_type: str) -> None:
    """Quantize the GGUF ``source`` (f32) into ``target``; ``RunError`` with llama.cpp's output."""
    ftype, name = K_QUANTS[gguf_type]
    if quantizer.kind == "executable":
        cmd = [str(quantizer.path), str(source), str(target), name]
    else:
        cmd = [sys.executable, "-m", __name__, str(quantizer.path), str(source), str(target)]
        cmd.append(str(ftype))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:  # not a program this machine runs (another architecture, a script)
        raise RunError(
            f"llama.cpp's quantizer {quantizer.path} could not be started ({exc.strerror}); "
            "nothing was exported",
            fix=f"point {ENV} at a llama-quantize built for this machine: {INSTALL}",
        ) from exc
    if done.returncode != 0 or not target.is_file():
        target.unlink(missing_ok=True)
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise RunError(
            f"llama.cpp could not quantize to {gguf_type} ({quantizer.describe()}, exit "
            f"{done.returncode}): {tail}; nothing was exported",
            fix=f"check that {quantizer.path} is a working llama.cpp; install one: {INSTALL}",
        )


def _quantize_with_library(library: str, source: str, target: str, ftype: int) -> int:
    """Child process: call ``llama_model_quantize`` of a libllama through ctypes."""
    import ctypes

    lib = ctypes.CDLL(library)  # finds its libggml* next to it (RUNPATH $ORIGIN)

    class Params(ctypes.Structure):
        # llama_model_quantize_params starts with nthread and ftype; the rest (flags and
        # pointers, which vary between llama.cpp versions) is kept as llama.cpp's defaults
        _fields_ = [("nthread", ctypes.c_int32), ("ftype", ctypes.c_int32)]
        _fields_ += [("rest", ctypes.c_uint8 * 504)]

    lib.llama_model_quantize_default_params.restype = Params
    lib.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(Params)]
    lib.llama_model_quantize.restype = ctypes.c_uint32
    lib.llama_backend_init()
    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype
    return int(lib.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params)))


if __name__ == "__main__":
    sys.exit(_quantize_with_library(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
