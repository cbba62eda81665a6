"""Perplexity is token-weighted: the same for any eval batch size, equal to scoring each
example alone."""

from __future__ import annotations

import math
import random

import pytest
import torch
from helpers import load_tiny_model
from lorakit.data.tokenize import IGNORE_INDEX, Tokenized
from lorakit.evaluation.scoring import loss_sums

VOCAB = 300  # token ids drawn below this


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    model = load_tiny_model(tiny_model_dir)
    assert model.config.vocab_size >= VOCAB
    return model


def rows(n: int, seed: int = 1) -> list[Tokenized]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(4, 40)
        ids = [rng.randrange(1, VOCAB) for _ in range(length)]
        prompt = rng.randint(1, length - 2)  # at least two supervised tokens
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        out.append(Tokenized(ids, labels))
    return out


def manual_nll(model, data: list[Tokenized]) -> tuple[float, int]:
    """One example at a time, no padding at all: the reference value."""
    total, count = 0.0, 0
    with torch.no_grad():
        for r in data:
            logits = model(input_ids=torch.tensor([r.input_ids])).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            for pos in range(1, len(r.labels)):
                if r.labels[pos] != IGNORE_INDEX:
                    total -= logp[pos - 1, r.labels[pos]].item()
                    count += 1
    return total, count


def test_perplexity_identical_for_batch_sizes_1_and_8(tiny_model):
    data = rows(21)
    nll1, n1 = loss_sums(tiny_model, data, batch_size=1)
    nll8, n8 = loss_sums(tiny_model, data, batch_size=8)
    assert n1 == n8 == sum(r.n_supervised for r in data)
    assert math.exp(nll8 / n8) == pytest.approx(math.exp(nll1 / n1), rel=1e-6)
    ref_nll, ref_n = manual_nll(tiny_model, data)
    assert ref_n == n1
    assert nll8 == pytest.approx(ref_nll, rel=1e-5)


def test_scoring_leaves_the_model_attention_as_it_was(tiny_model):
    """Loss scoring packs rows (no padding to score at all) with packed-row attention, then
    gives the model back its own attention for generation."""
    before = tiny_model.config._attn_implementation
    a, n = loss_sums(tiny_model, rows(5, seed=3), batch_size=5)
    assert tiny_model.config._attn_implementation == before
    ref, m = manual_nll(tiny_model, rows(5, seed=3))
    assert n == m and a == pytest.approx(ref, rel=1e-5)
