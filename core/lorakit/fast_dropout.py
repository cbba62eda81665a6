"""LoRA dropout that costs a third of ``nn.Dropout`` on CPU.

PEFT puts an ``nn.Dropout`` in front of every adapter. On CPU its mask costs one call of the
random generator per element, which on a 135M model is as slow as the layer's own matmul (about
9% of a step on 2 cores). :class:`FastDropout` cuts random words into 16-bit numbers, and an
element is kept when its number is at or above ``round(p * 65536)``. The drop rate is therefore
``p`` rounded to 1/65536 (0.05 becomes 0.0500030...), kept elements are scaled by
``1 / (1 - rate)`` as in ``nn.Dropout``, and in eval mode it is the identity.

Where the words come from. On CPU, torch's generator (Mersenne Twister) makes 32 random bits
in about 1.5 ns, which was still the largest single operation of a bf16 step after the matmuls
(0.34 ms a layer for a 634-token row, 4% of a SmolLM2-135M step on 2 cores of an AMD EPYC). So a
mask takes one 32-bit key from torch's seeded generator and makes its words as
``mix(mix(i) ^ key)`` for ``i = 0, 1, ...``: ``mix`` is a 32-bit integer hash with strong
avalanche (Chris Wellons' "lowbias32": xor-shift, multiply, xor-shift, multiply, xor-shift), and
``mix(i)`` is computed once and kept (up to ``COUNTER_WORDS`` words; a larger mask takes a key
per block of that many), so a mask costs one hash pass over its words (0.11 ms there) and the
key makes each mask a different stream, as a counter-based generator (Philox on GPUs) does.
Runs stay reproducible and resumable, since the keys come from torch's generator in order.
Other devices draw their words from torch's generator.

The mask is applied as a multiply by a 0/1 tensor of the input's dtype, made from the mask's
bytes: PyTorch's CPU kernels for ``where`` with a bool mask, and for converting a bool tensor,
are not vectorized (on a [706, 576] bf16 input ``where`` costs 5x a multiply), while a uint8 to
bf16/fp32 conversion and a same-dtype multiply are. ``x * scale`` times 1 or 0 is what
``where(keep, x * scale, 0)`` gives (a dropped negative element becomes -0.0 instead of 0.0,
which no sum can tell apart).
"""

from __future__ import annotations

from typing import Any

import torch

LEVELS = 1 << 16


class FastDropout(torch.nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        # numbers below this (of 65536) are dropped; a p within 1/131072 of 1 would round to
        # dropping everything (and divide by zero below): it drops 65535 of 65536 instead
        self.threshold = min(round(p * LEVELS), LEVELS - 1)
        self.scale = LEVELS / (LEVELS - self.threshold)

    @property
    def rate(self) -> float:
        """The drop probability actually used (``p`` rounded to 1/65536)."""
        return self.threshold / LEVELS

    def keep_bytes(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """1 (uint8) where an element is kept, 0 where it is dropped; :func:`ones_where_kept`
        turns it into the multiplier."""
        n = shape.numel()
        if self.threshold == 0:
            return torch.ones(shape, dtype=torch.uint8, device=device)
        # uniform over [-32768, 32767]
        numbers = random_numbers(n, torch.device(device)).view(shape)
        return at_or_above(numbers, self.threshold - LEVELS // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        # scaling x by a Python float keeps the scale exact in low-precision dtypes too
        keep = self.keep_bytes(x.shape, x.device)
        return (x * self.scale).mul_(ones_where_kept(keep, x.dtype))

    def extra_repr(self) -> str:
        return f"p={self.p}"


_MIX_1 = 0x7FEB352D
_MIX_2 = 0x846CA68B - (1 << 32)  # as an int32
_counter_mix: torch.Tensor | None = None  # mix(i) for i = 0, 1, ..., grown when needed


def mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int32 tensor, in place: torch's right shift of an int32 is arithmetic,
    so each is masked to the logical shift's bits; the multiplies wrap around as uint32 ones do."""
    x = x.bitwise_xor_(x.bitwise_right_shift(16).bitwise_and_(0xFFFF))
    x = x.mul_(_MIX_1)
    x = x.bitwise_xor_(x.bitwise_right_shift(15).bitwise_and_(0x1FFFF))
    x = x.mul_(_MIX_2)
    return x.bitwise_xor_(x.bitwise_right_shift(16).bitwise_and_(0xFFFF))


# the hashed counter is kept up to this many words (16 MiB); a larger mask takes a key per
# block of this many words, so the kept memory does not grow with the largest layer
COUNTER_WORDS = 1 << 22


def random_numbers(n: int, device: torch.device) -> torch.Tensor:
    """``n`` random int16 numbers: on CPU from keys drawn from torch's generator, one per
    :data:`COUNTER_WORDS` 32-bit words (see the module's docstring), elsewhere from torch's
    generator directly."""
    global _counter_mix
    if device.type != "cpu":
        words = torch.randint(
            -(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device
        )
        return words.view(torch.int16)[:n]
    count = (n + 1) // 2
    if _counter_mix is None or _counter_mix.numel() < min(count, COUNTER_WORDS):
        size = min(
            COUNTER_WORDS, max(count, 2 * (0 if _counter_mix is None else _counter_mix.numel()))
        )
        _counter_mix = mix(torch.arange(size, dtype=torch.int32))
    blocks = -(-count // COUNTER_WORDS)
    keys = torch.randint(-(2**31), 2**31 - 1, (blocks,), dtype=torch.int64).tolist()
    words = torch.empty(count, dtype=torch.int32)
    for b, key in enumerate(keys):
        block = words[b * COUNTER_WORDS : (b + 1) * COUNTER_WORDS]
        torch.bitwise_xor(_counter_mix[: block.numel()], key, out=block)
        mix(block)
    return words.view(torch.int16)[:n]


def at_or_above(numbers: torch.Tensor, t: int) -> torch.Tensor:
    """1 (uint8) where an int16 ``numbers`` is at least ``t`` (> -32768), else 0: clamped to
    [t - 1, t], minus t - 1, in int16 arithmetic (a comparison into a bool tensor costs 3x that
    on CPU)."""
    return numbers.clamp(t - 1, t).sub_(t - 1).to(torch.uint8)


def ones_where_kept(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 where ``keep`` (uint8) is set, 0 elsewhere, in ``dtype``: a mask a same-dtype multiply
    applies (see the module's docstring for why not ``where``)."""
    return keep.to(dtype)


def use_fast_dropout(model: Any) -> int:
    """Swap every LoRA ``nn.Dropout`` of a PEFT model for :class:`FastDropout`; return how many."""
    swapped = 0
    for module in model.modules():
        table = getattr(module, "lora_dropout", None)
        if not isinstance(table, torch.nn.ModuleDict):
            continue
        for name, layer in list(table.items()):
            if type(layer) is torch.nn.Dropout and layer.p > 0:
                table[name] = FastDropout(layer.p)
                swapped += 1
    return swapped
