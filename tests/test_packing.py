"""Packed padding-free batches: the layout, no attention across examples (trl#1163), the same
loss as a padded batch, and a loss that does not depend on how examples are grouped."""

from __future__ import annotations

import itertools
import json

import pytest
from helpers import chat_records, load_tiny_model, run_adapter, tiny_recipe, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st
from lorakit.packing import IGNORE_INDEX, pack


def test_pack_layout():
    a = {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}
    b = {"input_ids": [9, 10, 11], "labels": [-100, 10, 11]}
    batch = pack([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    # position i predicts token i+1 of the same example; the last position of each predicts nothing
    assert batch["labels"].tolist() == [[-100, 7, 8, -100, 10, 11, -100]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 7]
    assert batch["max_length_q"] == 4


rows_strategy = st.lists(
    st.lists(st.tuples(st.integers(0, 500), st.booleans()), min_size=1, max_size=30),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(rows_strategy)
def test_pack_keeps_every_target_once_and_never_crosses_examples(spec):
    rows = [
        {"input_ids": [t for t, _ in r], "labels": [t if s else IGNORE_INDEX for t, s in r]}
        for r in spec
    ]
    batch = pack(rows)
    targets = batch["labels"][0].tolist()
    bounds = batch["cu_seq_lens_q"].tolist()
    assert bounds[0] == 0 and bounds[-1] == len(targets) == sum(len(r["input_ids"]) for r in rows)
    for row, (a, b) in zip(rows, itertools.pairwise(bounds), strict=True):
        # the supervised tokens of an example, except its first (nothing predicts it), appear
        # exactly once, in order, inside that example's span and nowhere else
        assert targets[a:b] == [*row["labels"][1:], IGNORE_INDEX]
        assert batch["position_ids"][0, a:b].tolist() == list(range(b - a))


def test_pack_refuses_empty_input():
    with pytest.raises(ValueError):
        pack([])
    with pytest.raises(ValueError):
        pack([{"input_ids": [], "labels": []}])
    with pytest.raises(ValueError):
        pack([{"input_ids": [1, 2], "labels": [1]}])


def _tiny_model(tiny_model_dir):
    from lorakit.attention import use_packed_attention

    model, reference = load_tiny_model(tiny_model_dir), load_tiny_model(tiny_model_dir)
    use_packed_attention(model, "cpu")
    return model, reference


ROWS = [
    {"input_ids": [5, 17, 33, 41, 60, 7], "labels": [-100, -100, 33, 41, 60, 7]},
    {"input_ids": [9, 12, 80, 3], "labels": [-100, 12, 80, 3]},
    {"input_ids": [44, 45, 46, 47, 48, 49, 50, 51, 52], "labels": [-100] * 5 + [49, 50, 51, 52]},
]


@pytest.mark.slow
def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir):
    import torch
    from lorakit.attention import NAME

    model, reference = _tiny_model(tiny_model_dir)
    assert model.config._attn_implementation == NAME
    batch = pack(ROWS)
    kwargs = {k: batch[k] for k in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k")}
    with torch.no_grad(), pytest.raises(RuntimeError, match="cu_seq_lens_q"):
        # without boundaries it refuses: proof that lorakit_varlen, not SDPA, is running
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    with torch.no_grad(), pytest.raises(RuntimeError):
        model.generate(input_ids=torch.tensor([ROWS[0]["input_ids"]]), max_new_tokens=2)
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits[0]
        bounds = batch["cu_seq_lens_q"].tolist()
        for row, (a, b) in zip(ROWS, itertools.pairwise(bounds), strict=True):
            alone = reference(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            assert torch.allclose(together[a:b], alone, atol=1e-5), "an example saw another"


def _per_example_attention(query, key, value, bounds):
    """The reference: each example through SDPA on its own (what the CPU path does)."""
    import torch
    import torch.nn.functional as F

    pieces = [
        F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, enable_gqa=True
        )
        for a, b in itertools.pairwise(bounds)
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2)


def _packed_qkv(device, dtype, bounds, heads=6, kv_heads=2, dim=16):
    import torch

    generator = torch.Generator().manual_seed(0)
    total = bounds[-1]
    return [
        torch.randn(1, h, total, dim, generator=generator).to(device, dtype).requires_grad_()
        for h in (heads, kv_heads, kv_heads)
    ]


def _attention_grads(out, tensors):
    import torch

    weights = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    return torch.autograd.grad((out.float() * weights).sum(), tensors)


def test_one_call_packed_attention_equals_the_per_example_loop():
    """The GPU fallback (one SDPA call, block-diagonal causal mask, grouped KV heads expanded)
    gives the per-example loop's output and gradients; run here on CPU in fp32."""
    import torch
    from lorakit.attention import _packed_one_call

    bounds = [0, 5, 17, 18, 40]
    q, k, v = _packed_qkv("cpu", torch.float32, bounds)
    cu = torch.tensor(bounds, dtype=torch.int32)
    one, _ = _packed_one_call(q, k, v, cu, 0.0, None, None, 22)
    ref = _per_example_attention(q, k, v, bounds)
    assert torch.allclose(one, ref, atol=1e-6)
    for a, b in zip(
        _attention_grads(one, [q, k, v]), _attention_grads(ref, [q, k, v]), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-5)
    from lorakit.errors import RunError

    with pytest.raises(RunError, match="sliding attention window of 8 tokens"):
        _packed_one_call(q, k, v, cu, 0.0, None, 8, 22)


def test_cuda_packed_attention_matches_the_per_example_loop():
    """On a GPU, lorakit_varlen makes one kernel call per layer (PyTorch's flash varlen kernel
    where it exists): same output and gradients as each example alone, to bf16 precision."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from lorakit.attention import varlen_kernel, varlen_sdpa

    class Module(torch.nn.Module):
        pass

    bounds = [0, 37, 150, 151, 400]
    q, k, v = _packed_qkv("cuda", torch.bfloat16, bounds, heads=9, kv_heads=3, dim=64)
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    out, _ = varlen_sdpa(Module().eval(), q, k, v, None, cu_seq_lens_q=cu, max_length_q=249)
    ref = _per_example_attention(q, k, v, bounds)
    if hasattr(torch.nn.attention, "varlen") and torch.cuda.get_device_capability() >= (8, 0):
        # the flash kernel ran (a signature it could not call would have switched it off)
        assert varlen_kernel() is not None
    assert (out.float() - ref.float()).abs().max() < 2e-2
    for a, b in zip(
        _attention_grads(out, [q, k, v]), _attention_grads(ref, [q, k, v]), strict=True
    ):
        assert (a.float() - b.float()).abs().max() < 5e-2 * max(1.0, b.float().abs().max())


@pytest.mark.slow
def test_packed_loss_and_gradients_equal_a_padded_batch(tiny_model_dir):
    """The packed, supervised-only loss is the padded batch's token-weighted loss, and its
    gradients are the same (the head only skips positions with no target)."""
    import torch
    from lorakit.loss import supervised_nll

    model, reference = _tiny_model(tiny_model_dir)
    model.train()
    reference.train()
    nll, n = supervised_nll(model, pack(ROWS))
    loss = nll / n
    longest = max(len(r["input_ids"]) for r in ROWS)
    ids = torch.zeros((len(ROWS), longest), dtype=torch.long)
    labels = torch.full((len(ROWS), longest), IGNORE_INDEX)
    mask = torch.zeros((len(ROWS), longest), dtype=torch.long)
    for i, r in enumerate(ROWS):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
        mask[i, : len(r["input_ids"])] = 1
    padded = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert n == sum(sum(1 for t in r["labels"][1:] if t != IGNORE_INDEX) for r in ROWS)
    assert torch.allclose(loss, padded, atol=1e-6), (loss.item(), padded.item())
    loss.backward()
    padded.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


@pytest.mark.slow
def test_loss_does_not_depend_on_how_examples_are_grouped(
    tmp_path, tiny_model_dir, cli, compute_dtype
):
    """One micro-batch of 4, or 2 of 2 with gradient accumulation, or 4 of 1: the same examples
    per optimizer step give the same adapter (loss = summed token NLL / tokens of the step)."""
    records = chat_records(40)
    for i, r in enumerate(records):  # uneven answer lengths, so per-micro-batch means would differ
        r["messages"][1]["content"] += " ok" * (i % 7)
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data, dtype=compute_dtype)
    common = ("train.max_steps=3", "peft.dropout=0.0", 'eval.metrics=["eval_loss"]')
    for name, bs, ga in (("b4", 4, 1), ("b2", 2, 2), ("b1", 1, 4)):
        code, _, err = cli(
            "run",
            recipe,
            f"output.name={name}",
            f"train.per_device_train_batch_size={bs}",
            f"train.gradient_accumulation_steps={ga}",
            *common,
        )
        assert code == 0, err
    a, b, c = (run_adapter(tmp_path / "runs" / n) for n in ("b4", "b2", "b1"))
    if compute_dtype == "fp32":
        # Summation order only: the gradients differ by fp32 rounding (~1e-7 relative). Adam
        # divides each element by its own magnitude, so an element whose gradient is within
        # that noise of 0 may still move by up to 2 x lr a step (an AMD Zen 5's kernels moved
        # one element of 8192 by 1.1e-6): elementwise bounds depend on the CPU's kernels.
        # lora_B starts at 0, so it *is* the update; as a whole it must agree to 1e-4
        # (measured 8e-6 there; on an AMX Xeon every element agreed to 1e-6). A grouping bug
        # changes every gradient's weighting, the whole update and the step-1 loss.
        for k in a:
            for other in (b, c):
                assert (a[k] - other[k]).norm() <= 1e-4 * a[k].norm(), k
        loss_rel = 1e-6
    else:
        # Grouping changes which examples share a packed row, so bf16 matmuls see other shapes
        # and round differently (half a bf16 ulp, 2^-9 relative, per op), and the gradients
        # differ by bf16 noise. Adam divides each gradient element by its own magnitude, so
        # an element whose gradient is near 0 can move by up to 2 x lr per step either way:
        # elementwise bounds mean nothing here. What must agree is the update as a whole:
        # lora_B starts at 0, so it *is* the update; its difference must stay a small part
        # of it (measured ~3% at most), and the losses (fp32 sums of per-token NLLs of bf16
        # logits, where a grouping bug such as a mean of micro-batch means shows at step 1)
        # within a quarter of a bf16 ulp.
        for k in (k for k in a if "lora_B" in k):
            for other in (b, c):
                assert (a[k] - other[k]).norm() <= 0.1 * a[k].norm(), k
        loss_rel = 2**-8 / 4
    logged = [
        [
            json.loads(x)["loss"]
            for x in (tmp_path / "runs" / n / "metrics.jsonl").open()
            if '"loss"' in x
        ]
        for n in ("b4", "b2", "b1")
    ]
    assert len(logged[0]) == 3
    assert logged[1] == pytest.approx(logged[0], rel=loss_rel, abs=1e-5)
    assert logged[2] == pytest.approx(logged[0], rel=loss_rel, abs=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 300), min_size=1, max_size=60),
    st.integers(1, 900),
    st.integers(0, 3),
)
def test_token_budget_batches_use_every_example_once_within_budget(lengths, budget, epoch):
    from lorakit.packing import TokenBudgetBatches

    sampler = TokenBudgetBatches(lengths, budget, seed=11)
    first = list(sampler)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths))), "each example exactly once per epoch"
    assert len(batches) == len(first) == len(sampler), "the same number of batches every epoch"
    for b in first:  # epoch 0 fixes the count and keeps the budget
        assert len(b) == 1 or sum(lengths[i] for i in b) <= budget
    longest = max(lengths)
    for b in batches:  # a merge in a later epoch joins two batches of epoch-0 size at most
        assert sum(lengths[i] for i in b) <= budget + max(budget, longest)
    assert list(sampler) == batches, "seeded, repeatable"


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 300), max_size=60), st.integers(1, 900))
def test_consecutive_batches_keep_the_order_and_fill_the_budget(lengths, budget):
    from lorakit.packing import consecutive_batches

    batches = consecutive_batches(lengths, budget)
    assert [i for b in batches for i in b] == list(range(len(lengths))), "every row once, in order"
    for k, b in enumerate(batches):
        tokens = sum(lengths[i] for i in b)
        assert len(b) == 1 or tokens <= budget, "within the budget (a long row: on its own)"
        if k + 1 < len(batches):  # full: the next row would not have fitted
            assert tokens + lengths[batches[k + 1][0]] > budget
    assert consecutive_batches(lengths, budget) == batches


def test_token_budget_order_changes_with_the_epoch():
    from lorakit.packing import TokenBudgetBatches

    sampler = TokenBudgetBatches([10] * 50, 40, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert all(len(b) == 4 for b in first[:-1])


@pytest.mark.slow
def test_packing_true_fills_micro_batches_by_tokens(tmp_path, tiny_model_dir, chat_file, cli):

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file)
    for name, packing in (("rows", "false"), ("tokens", "true")):
        code, _, err = cli(
            "run",
            recipe,
            f"output.name={name}",
            f"train.packing={packing}",
            "train.max_steps=2",
            'eval.metrics=["eval_loss"]',
        )
        assert code == 0, err
    seen = {
        n: [
            json.loads(x)["num_input_tokens_seen"]
            for x in (tmp_path / "runs" / n / "metrics.jsonl").open()
            if '"loss"' in x
        ]
        for n in ("rows", "tokens")
    }
    # 4 rows of ~30 tokens per step, against up to 4 x 64 tokens of examples per step
    assert seen["tokens"][0] > 1.3 * seen["rows"][0], seen
    assert all(n <= 4 * 64 * k for k, n in enumerate(seen["tokens"], start=1)), seen


@pytest.mark.slow
def test_token_budget_run_resumes_to_the_uninterrupted_adapter(tmp_path, tiny_model_dir, cli):
    """packing = true keeps exact resume, also from a checkpoint inside the second epoch (about
    6 token-budget batches an epoch here): the batches after the checkpoint are the same ones."""
    import torch

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data)
    common = (
        "train.packing=true",
        "train.save_steps=4",
        'train.lr_scheduler_type="constant"',
        'eval.metrics=["eval_loss"]',
    )
    assert cli("run", recipe, "output.name=full", "train.max_steps=10", *common)[0] == 0
    assert cli("run", recipe, "output.name=cut", "train.max_steps=8", *common)[0] == 0
    code, _, err = cli(
        "run",
        recipe,
        "output.name=cut",
        "train.max_steps=10",
        *common,
        "--resume-from-checkpoint",
        "auto",
    )
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "runs" / "cut" / "metrics.jsonl").open()]
    assert next(r["epoch"] for r in rows if r["step"] == 8) > 1.0, "checkpoint not in epoch 2"
    a, b = run_adapter(tmp_path / "runs" / "full"), run_adapter(tmp_path / "runs" / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed token-budget run differs"


@pytest.mark.slow
def test_token_budget_epochs_with_accumulation_see_every_example(tmp_path, tiny_model_dir, cli):
    """Three epochs with gradient accumulation 2: the Trainer takes every batch of every epoch
    (the batch count it planned with holds in each epoch), like row batches do."""

    records = chat_records(60)
    for i, r in enumerate(records):  # mixed lengths, so each epoch packs differently
        r["messages"][1]["content"] += " ok" * (i % 9)
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data)
    common = (
        "train.max_steps=-1",
        "train.num_train_epochs=3",
        "train.gradient_accumulation_steps=2",
        "train.save_steps=1000",
        'eval.metrics=["eval_loss"]',
    )
    seen = {}
    for name, packing in (("rows", "false"), ("tokens", "true")):
        code, _, err = cli(
            "run", recipe, f"output.name={name}", f"train.packing={packing}", *common
        )
        assert code == 0, err
        rows = [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").open()]
        seen[name] = max(r.get("num_input_tokens_seen", 0) for r in rows)
    assert seen["tokens"] == seen["rows"] > 0, seen
