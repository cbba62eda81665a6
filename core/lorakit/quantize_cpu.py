"""bitsandbytes' 4-bit quantization on CPU, done in chunks: the same bytes in a fraction of the time.

Loading a checkpoint in 4-bit quantizes every linear weight as it arrives, and on CPU
bitsandbytes does that with whole-tensor PyTorch operations: an fp32 copy of the weight, its
absolute values, the scaled and clamped values, ``torch.bucketize`` into an int32 code per
weight (a binary search per element), then the packing. For SmolLM2-1.7B's shapes that was
nearly all of a 30-40 s load, and each of those temporaries is a full-size allocation (the heap
growth ``device.loading_memory`` deals with).

:func:`quantize_4bit` computes the same values a chunk of 16384 blocks at a time, in scratch
buffers reused from chunk to chunk: the block maxima with ``amax``, the scaling in place with
the same expression, and each weight's code as the number of bin edges below it (15 vectorised
comparisons: for a value that is not NaN exactly ``bucketize``'s answer; a chunk with a block
whose maximum is NaN or infinite, the only way a scaled value is NaN, goes through ``bucketize``).
:func:`chunked_4bit_quantization` installs it as the CPU kernel of ``bitsandbytes::quantize_4bit``
for the length of a block, and only after a check in this process that it gives bitsandbytes' own
kernel's bytes on awkward input (ties on the bin edges, zeros, NaN and infinity, a length that is
not a multiple of the block size, an odd length, both 4-bit types, three input dtypes); if it
does not, bitsandbytes' kernel stays.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

CHUNK_BLOCKS = 16384  # 1M weights a chunk at the default block size of 64
_depth = 0
_owner = 0  # the thread that opened the outermost block
_verified: bool | None = None
_bounds_cache: dict[str, tuple[Any, Any]] = {}
_buffers: dict[str, Any] = {}


def _bounds(quant_type: str) -> tuple[Any, Any]:
    """The 15 bin edges between the sorted 4-bit code values, and the sorted order."""
    if quant_type not in _bounds_cache:
        import torch
        from bitsandbytes.functional import get_4bit_type

        code = get_4bit_type(quant_type, device=torch.device("cpu"))
        order = torch.argsort(code)
        ranked = code[order]
        _bounds_cache[quant_type] = ((ranked[:-1] + ranked[1:]) / 2, order)
    return _bounds_cache[quant_type]


def _scratch(name: str, numel: int, dtype: Any) -> Any:
    """A scratch buffer kept for the next weight while the block is open: with
    ``device.loading_memory`` every fresh tensor of 128 KiB or more is a new mapping whose pages
    fault on first touch, and a chunk's temporaries are a few MB each."""
    import torch

    if _depth == 0 or threading.get_ident() != _owner:  # kept only for the block's own thread
        return torch.empty(numel, dtype=dtype)
    buffer = _buffers.get(name)
    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
        buffer = _buffers[name] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def quantize_4bit(A: Any, blocksize: int, quant_type: str, quant_storage: Any) -> tuple[Any, Any]:
    """``bitsandbytes::quantize_4bit`` on CPU: (packed codes ``[ceil(n/2), 1]``, absmax)."""
    import torch

    bounds, order = _bounds(quant_type)
    edges = bounds.tolist()
    flat = A.reshape(-1)
    n = flat.numel()
    blocks = n // blocksize
    full = blocks * blocksize
    absmax = torch.empty(blocks + (1 if full < n else 0), dtype=torch.float32)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    for first in range(0, blocks, CHUNK_BLOCKS):
        last = min(blocks, first + CHUNK_BLOCKS)
        size = (last - first) * blocksize
        chunk = _scratch("chunk", size, torch.float32)
        chunk.copy_(flat[first * blocksize : last * blocksize])
        magnitude = _scratch("magnitude", size, torch.float32)
        torch.abs(chunk, out=magnitude)
        biggest = magnitude.view(-1, blocksize).amax(dim=-1)
        absmax[first:last] = biggest
        chunk.view(-1, blocksize).mul_(1.0 / biggest.clamp(min=1e-38).view(-1, 1))
        chunk.clamp_(-1, 1)
        codes = _scratch("codes", size, torch.uint8)
        if bool(torch.isfinite(biggest).all()):
            # no NaN among the scaled values: a weight's bin is how many edges lie below it
            above = _scratch("above", size, torch.bool)
            torch.gt(chunk, edges[0], out=codes)
            for edge in edges[1:]:
                codes.add_(torch.gt(chunk, edge, out=above))
        else:  # a block with NaN or infinity: bucketize's own answer
            codes.copy_(torch.bucketize(chunk, bounds, out_int32=True))
        if quant_type != "nf4":
            codes.copy_(order[codes.long()])
        high = _scratch("high", size // 2, torch.uint8)
        torch.bitwise_left_shift(codes[::2], 4, out=high)
        torch.bitwise_or(
            high, codes[1::2], out=packed[first * blocksize // 2 : last * blocksize // 2]
        )
    if full < n:  # the last, shorter block: scaled by a division, as bitsandbytes does
        tail = flat[full:].float()
        biggest = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = biggest
        scaled = torch.clamp(tail / biggest, -1, 1)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        rest = torch.bucketize(scaled, bounds, out_int32=True)
        if quant_type != "nf4":
            rest = order[rest]
        rest = rest.to(torch.uint8)
        packed[full // 2 :] = (rest[::2] << 4) | rest[1::2]
    packed = packed.unsqueeze(1)
    if quant_storage != torch.uint8:
        packed = packed.squeeze().view(quant_storage).unsqueeze(1)
    return packed, absmax


def _same(a: Any, b: Any) -> bool:
    """Bit for bit, except that any NaN equals any NaN (a block holding NaN or infinity has a
    NaN maximum, whose sign bit differs between ``max`` and ``amax``; it dequantizes to NaN
    either way)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        nan = torch.isnan(a)
        if not torch.equal(nan, torch.isnan(b)):
            return False
        a, b = a.masked_fill(nan, 0), b.masked_fill(nan, 0)
        if a.dtype == torch.float32:  # -0.0 and 0.0 apart
            a, b = a.view(torch.int32), b.view(torch.int32)
    return bool(torch.equal(a, b))


def _matches_bitsandbytes() -> bool:
    """Does :func:`quantize_4bit` give what the op does now (bitsandbytes' kernel)?"""
    import torch

    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(3 * 4096 + 37, generator=generator) * 0.05
    weights[:64] = 0.0  # an all-zero block
    weights[64:128] = torch.linspace(-1, 1, 64)  # ends of the range
    weights[200] = float("nan")
    weights[300] = float("inf")
    for quant_type in ("nf4", "fp4"):
        edges, _ = _bounds(quant_type)
        weights[1024 : 1024 + 15] = edges  # ties: block maximum 1, values on the edges
        weights[1024 + 15] = 1.0
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for blocksize in (64, 128):
                # a tail block, an odd length, whole blocks stored as fp32 words
                for length, storage in (
                    (weights.numel(), torch.uint8),
                    (weights.numel() - 1, torch.uint8),
                    (4096, torch.float32),
                ):
                    A = weights[:length].to(dtype).view(-1, 1)
                    want = torch.ops.bitsandbytes.quantize_4bit.default(
                        A, blocksize, quant_type, storage
                    )
                    got = quantize_4bit(A, blocksize, quant_type, storage)
                    if want[0].shape != got[0].shape or want[0].dtype != got[0].dtype:
                        return False
                    packed_bytes = (t.contiguous().view(torch.uint8) for t in (want[0], got[0]))
                    if not torch.equal(*packed_bytes) or not _same(want[1], got[1]):
                        return False
    return True


@contextlib.contextmanager
def chunked_4bit_quantization() -> Iterator[None]:
    """Inside the block, 4-bit quantization of CPU tensors runs :func:`quantize_4bit`, when
    bitsandbytes is installed and the check against its own kernel passed in this process.
    Nested blocks install it once."""
    global _depth, _owner
    _depth += 1
    library = None
    try:
        if _depth == 1:
            _owner = threading.get_ident()
            library = _install()
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _buffers.clear()
        if library is not None and hasattr(library, "_destroy"):
            library._destroy()


def _install() -> Any:
    global _verified
    try:
        import bitsandbytes  # noqa: F401 - registers the op
        import torch

        torch.ops.bitsandbytes.quantize_4bit.default  # noqa: B018 - the op exists
    except (ImportError, AttributeError, RuntimeError):
        return None
    if _verified is None:
        try:
            _verified = _matches_bitsandbytes()
        except Exception:  # another bitsandbytes: its kernel stays, never a wrong model
            _verified = False
    if not _verified:
        return None
    library = torch.library.Library("bitsandbytes", "FRAGMENT")
    torch.library.register_kernel("bitsandbytes::quantize_4bit", "cpu", quantize_4bit, lib=library)
    return library
