"""FastDropout: the drop rate and scale of nn.Dropout, seeded masks, identity in eval mode."""

from __future__ import annotations

import pytest
import torch
from lorakit.fast_dropout import FastDropout, use_fast_dropout


def test_rate_scale_and_expectation():
    torch.manual_seed(0)
    drop = FastDropout(0.05).train()
    x = torch.ones(1000, 1000)
    y = drop(x)
    kept = y != 0
    assert abs(drop.rate - 0.05) < 1 / 65536
    assert abs(1 - kept.float().mean().item() - drop.rate) < 0.002  # 1e6 draws: ~0.0002 sd
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - drop.rate)))
    assert abs(y.mean().item() - 1.0) < 0.005, "unbiased, as nn.Dropout"


def test_masks_are_seeded_and_independent_per_call():
    drop = FastDropout(0.3).train()
    x = torch.randn(64, 33)  # a size that is not a multiple of 4
    torch.manual_seed(5)
    a, b = drop(x), drop(x)
    torch.manual_seed(5)
    assert torch.equal(drop(x), a), "same seed, same mask"
    assert not torch.equal(a, b), "each call draws a new mask"


def test_eval_mode_and_zero_rate_are_the_identity():
    x = torch.randn(8, 8)
    assert FastDropout(0.5).eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    with pytest.raises(ValueError):
        FastDropout(1.0)


def test_a_rate_that_rounds_to_one_keeps_one_level():
    # nn.Dropout(0.999995) is valid; its rate rounds to 65536/65536 here, which kept nothing
    # and divided the scale by zero
    drop = FastDropout(0.999995).train()
    assert drop.rate == 65535 / 65536 and drop.scale == 65536.0
    torch.manual_seed(0)
    y = drop(torch.ones(1 << 20))
    assert torch.isfinite(y).all() and 0 < (y != 0).sum() < 100


def test_gradient_is_masked_and_scaled():
    torch.manual_seed(1)
    drop = FastDropout(0.25).train()
    x = torch.randn(50, 40, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    keep = y.detach() != 0
    assert torch.allclose(x.grad[keep], torch.full_like(x.grad[keep], drop.scale))
    assert torch.all(x.grad[~keep] == 0)


def test_swaps_only_lora_dropout_layers():
    from peft import LoraConfig, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(8, 8)
            self.k = torch.nn.Linear(8, 8)
            self.keep = torch.nn.Dropout(0.5)

        def forward(self, x):
            return self.keep(self.q(x) + self.k(x))

    model = get_peft_model(Tiny(), LoraConfig(r=2, lora_dropout=0.1, target_modules=["q", "k"]))
    assert use_fast_dropout(model) == 2
    found = [m for m in model.modules() if isinstance(m, FastDropout)]
    assert len(found) == 2 and all(m.p == 0.1 for m in found)
    assert type(model.base_model.model.keep) is torch.nn.Dropout, "the model's own dropout stays"


@pytest.mark.parametrize("t", [-32767, -29491, 0, 1, 32767])
def test_the_mask_keeps_exactly_the_numbers_at_or_above_the_threshold(t):
    """The clamp arithmetic that makes the mask, over every int16 value."""
    from lorakit.fast_dropout import at_or_above

    numbers = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    keep = at_or_above(numbers, t)
    assert keep.dtype == torch.uint8
    assert torch.equal(keep.bool(), numbers >= t)


def test_a_zero_rate_mask_keeps_everything():
    keep = FastDropout(0.0).keep_bytes(torch.Size([5, 3]), torch.device("cpu"))
    assert keep.dtype == torch.uint8 and bool(keep.all())


def _lowbias32(x: int) -> int:
    """Chris Wellons' lowbias32 on a Python uint32, the reference for the int32 tensor version."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_the_cpu_hash_is_lowbias32_on_every_kind_of_word():
    """int32 tensors shift arithmetically and wrap on overflow: the tensor hash must still be the
    uint32 one, for words with the top bit set too."""
    from lorakit.fast_dropout import mix

    words = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x12345678, 0xDEADBEEF, 65535, 65536]
    as_int32 = torch.tensor(
        [w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32
    )
    got = [int(v) & 0xFFFFFFFF for v in mix(as_int32.clone())]
    assert got == [_lowbias32(w) for w in words]


def test_cpu_masks_are_uniform_and_uncorrelated():
    """The 16-bit numbers behind the masks: every bit set half the time, no correlation between
    neighbours or between two masks (2^20 numbers: sd of a bit's mean 1e-3, of a correlation
    1e-3)."""
    from lorakit.fast_dropout import random_numbers

    torch.manual_seed(3)
    n = 1 << 20
    a = random_numbers(n, torch.device("cpu"))
    b = random_numbers(n, torch.device("cpu"))
    bits = torch.stack([(a.int() >> i) & 1 for i in range(16)]).float().mean(dim=1)
    assert bits.sub(0.5).abs().max() < 5e-3
    af, bf = a.float(), b.float()
    assert torch.corrcoef(torch.stack([af[:-1], af[1:]]))[0, 1].abs() < 5e-3
    assert torch.corrcoef(torch.stack([af, bf]))[0, 1].abs() < 5e-3
    assert not torch.equal(a, b)
    torch.manual_seed(3)
    assert torch.equal(random_numbers(n, torch.device("cpu")), a), "seeded"


def test_a_mask_larger_than_the_kept_counter_takes_a_key_per_block(monkeypatch):
    """The kept hashed counter stops growing at COUNTER_WORDS; a larger mask hashes it once per
    block with a key of its own, so no block repeats another, and the result stays seeded."""
    from lorakit import fast_dropout

    monkeypatch.setattr(fast_dropout, "COUNTER_WORDS", 1024)
    monkeypatch.setattr(fast_dropout, "_counter_mix", None)
    torch.manual_seed(4)
    numbers = fast_dropout.random_numbers(5000, torch.device("cpu"))  # 2500 words: 3 blocks
    assert numbers.numel() == 5000 and fast_dropout._counter_mix.numel() == 1024
    words = numbers.view(torch.int32)
    assert not torch.equal(words[:1024], words[1024:2048])
    assert not torch.equal(words[:452], words[2048:2500])
    torch.manual_seed(4)
    assert torch.equal(fast_dropout.random_numbers(5000, torch.device("cpu")), numbers)
