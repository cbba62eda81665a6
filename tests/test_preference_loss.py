"""The preference losses against TRL's own code on the same log-probabilities, and the packed
per-sequence log-probabilities against a plain per-example computation (issue 23).

TRL's ``DPOTrainer`` computes its loss inline in ``_compute_loss``; the test runs that very
method on a stand-in trainer and model that hand it fixed per-token log-probabilities, so what
is compared is TRL's code, not a transcription of it.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from lorakit.preference import Objective, pack_pairs, pair_losses, sequence_logps

torch.set_num_threads(1)


def _fake_batch(pairs: int, seed: int = 0):
    """Per-token log-probs of ``2 * pairs`` sequences (chosen first, then rejected: TRL's
    layout) with answers of different lengths, and the matching masks."""
    g = torch.Generator().manual_seed(seed)
    T = 9
    mask = torch.zeros(2 * pairs, T, dtype=torch.long)
    for i in range(2 * pairs):
        start = 2 + i % 3
        mask[i, start : start + 2 + (i * 5) % 5] = 1
    per_token = -torch.rand(2 * pairs, T - 1, generator=g, dtype=torch.float64) * 3
    per_token = per_token * mask[:, 1:]
    ref_token = (-torch.rand(2 * pairs, T - 1, generator=g, dtype=torch.float64) * 3) * mask[:, 1:]
    return mask, per_token, ref_token


def _trl_dpo_loss(loss_type: str, beta: float, mask, per_token, ref_token) -> float:
    from trl import DPOTrainer

    class Out:
        def __init__(self, log_probs):
            self.log_probs = log_probs
            self.entropy = torch.zeros_like(log_probs)
            self.mean_logits = torch.zeros_like(log_probs)
            self.is_top1 = torch.zeros_like(log_probs, dtype=torch.bool)

    model = SimpleNamespace(training=True)
    ident = SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t)
    ref_logps = ref_token.sum(dim=1)
    fake = SimpleNamespace(
        model=model,
        accelerator=ident,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(),
    )
    pairs = mask.shape[0] // 2
    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": ref_logps[:pairs],
        "ref_rejected_logps": ref_logps[pairs:],
    }

    def forward(**kwargs):
        return Out(per_token)

    return float(DPOTrainer._compute_loss(fake, forward, inputs, False))


def _ours(objective: Objective, mask, per_token, ref_token):
    pairs = mask.shape[0] // 2
    order = [j for i in range(pairs) for j in (i, pairs + i)]  # chosen, rejected, chosen, ...
    logps = per_token.sum(dim=1)[order]
    counts = mask.sum(dim=1).double()[order]
    ref = ref_token.sum(dim=1)[order]
    return pair_losses(objective, logps, counts, ref)


@pytest.mark.parametrize(
    ("loss_type", "beta"), [("sigmoid", 0.1), ("sigmoid", 0.7), ("ipo", 0.2), ("hinge", 0.5)]
)
def test_dpo_matches_trl(loss_type, beta):
    mask, per_token, ref_token = _fake_batch(4)
    losses, chosen, rejected = _ours(
        Objective("dpo", beta=beta, loss_type=loss_type), mask, per_token, ref_token
    )
    expected = _trl_dpo_loss(loss_type, beta, mask, per_token, ref_token)
    assert float(losses.mean()) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    ratio = per_token.sum(dim=1) - ref_token.sum(dim=1)
    assert torch.allclose(chosen, beta * ratio[:4]) and torch.allclose(rejected, beta * ratio[4:])


def test_label_smoothing_is_conservative_dpo():
    import torch.nn.functional as F

    mask, per_token, ref_token = _fake_batch(3, seed=1)
    ls, beta = 0.2, 0.3
    losses, _, _ = _ours(
        Objective("dpo", beta=beta, label_smoothing=ls), mask, per_token, ref_token
    )
    ratio = per_token.sum(dim=1) - ref_token.sum(dim=1)
    d = ratio[:3] - ratio[3:]
    # (1 - ls) of the DPO loss, ls of the loss with chosen and rejected swapped
    expected = -(1 - ls) * F.logsigmoid(beta * d) - ls * F.logsigmoid(-beta * d)
    assert torch.allclose(losses, expected)


def test_simpo_and_orpo_match_trl():
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    mask, per_token, _ = _fake_batch(4, seed=2)
    counts = mask.sum(dim=1).double()
    avg = per_token.sum(dim=1) / counts
    device = SimpleNamespace(device="cpu")
    cpo = SimpleNamespace(
        loss_type="simpo",
        simpo_gamma=0.7,
        beta=2.0,
        label_smoothing=0.1,
        alpha=0.0,
        accelerator=device,
    )
    trl_simpo = CPOTrainer.cpo_loss(cpo, avg[:4], avg[4:])[0]
    ours, _, _ = _ours(
        Objective("simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=0.1),
        mask,
        per_token,
        per_token,
    )
    assert torch.allclose(ours, trl_simpo.double(), rtol=1e-6)

    orpo = SimpleNamespace(beta=0.25, accelerator=device)
    trl_ratio = ORPOTrainer.odds_ratio_loss(orpo, avg[:4], avg[4:])[0]
    ours, chosen, _ = _ours(Objective("orpo", orpo_lambda=0.25), mask, per_token, per_token)
    # ORPO = NLL of the chosen answer (per token) - λ log σ(log odds ratio)
    assert torch.allclose(ours - (-avg[:4]), -trl_ratio.double(), rtol=1e-6)
    assert torch.allclose(chosen, 0.25 * avg[:4])


@pytest.mark.parametrize("share_prompt", [False, True])
def test_packed_sequence_logps_equal_each_sequence_alone(tiny_model_dir, share_prompt):
    """Chosen and rejected of several pairs in one packed row: each sequence's log-prob sum is
    the one it has scored alone, and only answer positions count; also with each pair's prompt
    in the row once (the rejected answer attends back to it, never to the chosen answer)."""
    from helpers import load_tiny_model
    from lorakit.attention import packed_attention

    model = load_tiny_model(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(3):
        n_c, n_r = 7 + i, 5 + 2 * i
        c = torch.randint(3, 100, (n_c,), generator=g).tolist()
        r = c[:4] + torch.randint(3, 100, (n_r - 4,), generator=g).tolist()
        rows.append(
            {
                "chosen_ids": c,
                "chosen_labels": [-100] * 4 + c[4:],
                "rejected_ids": r,
                "rejected_labels": [-100] * 4 + r[4:],
            }
        )
    with torch.no_grad(), packed_attention(model, "cpu"):
        batch = pack_pairs(rows, share_prompt=share_prompt)
        sums, counts = sequence_logps(model, batch)
    sides = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    # the prompts' first 3 tokens are in the row once (the 4th predicts the first answer token)
    assert batch["input_ids"].shape[1] == sides - (3 * len(rows) if share_prompt else 0)
    assert counts.tolist() == [len(r[k]) - 4 for r in rows for k in ("chosen_ids", "rejected_ids")]
    with torch.no_grad():
        for j, (row, side) in enumerate((r, s) for r in rows for s in ("chosen", "rejected")):
            ids = torch.tensor([row[f"{side}_ids"]])
            logits = model(input_ids=ids).logits[0, :-1].double()
            logp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).squeeze(1)
            assert float(sums[j]) == pytest.approx(float(logp[3:].sum()), abs=1e-4)


def test_a_shared_prompt_pair_mask_hides_the_chosen_answer_from_the_rejected_one():
    """Positions 0-2 the prompt, 3-4 the chosen answer, 5-6 the rejected one."""
    from lorakit.attention import pair_mask

    mask = pair_mask(7, first=5, prompt=3).int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 1, 1],
    ]
    # nothing shared: two sequences side by side
    assert pair_mask(4, first=2, prompt=0).int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 1, 1],
    ]


def test_a_shared_prompt_longer_than_a_sliding_window_is_refused():
    from lorakit.attention import varlen_sdpa
    from lorakit.errors import RunError

    q = torch.zeros(1, 2, 9, 4)
    module = SimpleNamespace(training=False)
    cu = torch.tensor([0, 6, 9])  # prompt 4 + chosen 2, rejected 3: 7 tokens with its prompt
    shared = torch.tensor([4])
    varlen_sdpa(module, q, q, q, None, cu_seq_lens_q=cu, pair_prompt_lens=shared, sliding_window=7)
    with pytest.raises(RunError, match="sliding attention window"):
        varlen_sdpa(
            module, q, q, q, None, cu_seq_lens_q=cu, pair_prompt_lens=shared, sliding_window=6
        )


def test_a_fresh_adapter_adds_nothing_so_the_reference_skips_it(tiny_model_dir):
    """reference_logps computes a fresh adapter's reference with the adapter off: the values
    are the ones the adapter-on forward gives, bit for bit; a trained B is computed."""
    from helpers import load_tiny_model
    from lorakit.attention import packed_attention
    from lorakit.preference import adds_nothing
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        load_tiny_model(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear")
    ).eval()
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (8, 6)]
    rows = [
        {
            "chosen_ids": ids[0],
            "chosen_labels": [-100] * 3 + ids[0][3:],
            "rejected_ids": ids[1],
            "rejected_labels": [-100] * 3 + ids[1][3:],
        }
    ]
    batch = pack_pairs(rows, share_prompt=False)
    assert adds_nothing(model)
    with torch.no_grad(), packed_attention(model, "cpu"):
        on, _ = sequence_logps(model, batch)
        with model.disable_adapter():
            off, _ = sequence_logps(model, batch)
    assert on.equal(off)
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b[0, 0] = 1e-3
    assert not adds_nothing(model)
    assert not adds_nothing(load_tiny_model(tiny_model_dir))  # no adapter at all


@pytest.mark.parametrize(
    ("batch", "max_length", "budget"),
    [(4, 512, 4096), (8, 192, 3072), (1, 256, 512), (64, 4096, 4096)],
)
def test_a_reference_batch_holds_no_more_tokens_than_a_training_micro_batch(
    batch, max_length, budget
):
    """4096 packed tokens at most, and never more than a training micro-batch of pairs of up
    to twice max_length: the reference pass needs no more memory than a training step."""
    from lorakit.preference import reference_tokens
    from lorakit.sections import TrainSection

    train = TrainSection(per_device_train_batch_size=batch, max_length=max_length)
    assert reference_tokens(train) == budget
