"""The fused head + cross-entropy computes what ``lm_head`` then ``F.cross_entropy`` computes
(``lorakit.fused_head``)."""

from __future__ import annotations

import pytest
from helpers import build_tiny_model

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _unfused(hidden, weight, bias, targets):
    import torch.nn.functional as F

    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="none")


def _inputs(dtype_name: str, bias: bool, weight_grad: bool):
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(37, 24, generator=g) * 2).to(dtype).requires_grad_()
    weight = torch.randn(101, 24, generator=g).to(dtype).requires_grad_(weight_grad)
    b = torch.randn(101, generator=g).to(dtype).requires_grad_(weight_grad) if bias else None
    targets = torch.randint(0, 101, (37,), generator=g)
    scale = torch.rand(37, generator=g)  # a gradient that differs per position
    return hidden, weight, b, targets, scale


@pytest.mark.parametrize("keep", ["probabilities", "recompute"])
@pytest.mark.parametrize("block_rows", [1, 8, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_nll_and_gradients_match_the_unfused_head(
    compute_dtype, block_rows, bias, keep, monkeypatch
):
    import torch
    from lorakit import fused_head

    # a block of ``block_rows`` positions: one, several with a short last one, all at once
    monkeypatch.setattr(fused_head, "BLOCK_ELEMENTS", block_rows * 101)
    # backward from the probabilities kept by forward, or from recomputed logits
    monkeypatch.setattr(fused_head, "KEEP_ELEMENTS", 1 << 30 if keep == "probabilities" else 0)
    results = []
    for fn in (_unfused, fused_head.HeadNLL.apply):
        hidden, weight, b, targets, scale = _inputs(compute_dtype, bias, weight_grad=True)
        nll = fn(hidden, weight, b, targets)
        (nll * scale).sum().backward()
        grads = [hidden.grad, weight.grad] + ([b.grad] if bias else [])
        results.append((nll.detach(), grads))
    (ref, ref_grads), (got, got_grads) = results
    assert got.dtype == torch.float32
    # the same fp32 logits; only the order of the vocabulary-wide sums can differ
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    for g, r in zip(got_grads, ref_grads, strict=True):
        assert g.dtype == r.dtype
        if compute_dtype == "fp32":
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
        else:
            # both round the fp32 logit gradient to bf16 (8 significant bits) before the
            # matmul, which accumulates in fp32 and rounds once; a logit gradient that lands
            # on the other side of a rounding boundary moves a sum by a few bf16 ulps of its
            # largest term
            diff = (g.float() - r.float()).abs().max()
            assert diff <= 4 * 2**-8 * r.float().abs().max()


@pytest.mark.parametrize("keep", ["probabilities", "recompute"])
def test_under_autocast_the_gradients_are_autocasts(keep, monkeypatch):
    """fp32 weights under bf16 autocast (mixed precision; QLoRA's fp32 head): the logits are
    autocast's bf16 ones in forward and, when recomputed, in backward too."""
    import torch
    from lorakit import fused_head

    monkeypatch.setattr(fused_head, "KEEP_ELEMENTS", 1 << 30 if keep == "probabilities" else 0)
    results = []
    for fn in (_unfused, fused_head.HeadNLL.apply):
        hidden, weight, _, targets, scale = _inputs("fp32", False, weight_grad=False)
        with torch.no_grad():
            hidden.mul_(4)  # logits of a trained model's size: bf16 rounding shows
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll = fn(hidden, weight, None, targets)
        (nll * scale).sum().backward()
        results.append((nll.detach(), hidden.grad))
    (ref, ref_grad), (got, got_grad) = results
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    # the same bf16 logits; the unfused backward rounds the logit gradient to bf16 once more
    assert (got_grad - ref_grad).abs().max() <= 4 * 2**-8 * ref_grad.abs().max()


@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("keep", ["probabilities", "recompute"])
def test_an_fp32_head_with_a_bf16_matmul_is_the_bf16_head(keep, weight_grad, monkeypatch):
    """A CPU QLoRA model's fp32 head computing in bf16 (``matmul_dtype``): the NLL and the
    gradients of the same head with its input and weight rounded to bf16."""
    import torch
    from lorakit import fused_head

    monkeypatch.setattr(fused_head, "KEEP_ELEMENTS", 1 << 30 if keep == "probabilities" else 0)
    low = torch.bfloat16
    results = []
    for fused in (False, True):
        hidden, weight, b, targets, scale = _inputs("fp32", True, weight_grad=weight_grad)
        with torch.no_grad():
            hidden.mul_(4)  # logits of a trained model's size: bf16 rounding shows
        if fused:
            nll = fused_head.HeadNLL.apply(hidden, weight, b, targets, True, low)
        else:
            nll = _unfused(hidden.to(low), weight.to(low), b.to(low), targets)
        (nll * scale).sum().backward()
        grads = [hidden.grad] + ([weight.grad, b.grad] if weight_grad else [])
        results.append((nll.detach(), grads))
        if fused:  # the bf16 copy went with the other saved tensors
            with pytest.raises(RuntimeError):
                nll.grad_fn.saved_tensors  # noqa: B018
    (ref, ref_grads), (got, got_grads) = results
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    # the fp32 head's own logits differ from these by bf16 rounding: what the check can see
    exact = _unfused(hidden.detach(), weight.detach(), b.detach(), targets)
    assert (exact - got).abs().max() > 1e-4
    for g, r in zip(got_grads, ref_grads, strict=True):
        assert g.dtype == torch.float32
        assert (g - r).abs().max() <= 4 * 2**-8 * r.abs().max()
    if weight_grad:
        # the weight's gradient from the same bf16 operands, element by element: the unfused
        # path rounds it to bf16 (the cast's backward) where the fused one keeps the fp32 sum,
        # so within bf16's rounding (2**-8) and a little; one from the fp32 input and
        # probabilities instead misses by 5% of an element
        g, r = got_grads[1], ref_grads[1]
        assert ((g - r).abs() <= 2**-7 * r.abs() + 1e-4 * r.abs().max()).all()


def test_only_a_bf16_4bit_model_gets_a_bf16_head_matmul(tiny):
    import torch
    from lorakit.fused_head import head_matmul_dtype, plain_head
    from transformers import AutoModelForCausalLM

    for dtype in (torch.float32, torch.bfloat16):
        base = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=dtype)
        head = plain_head(base)
        assert head is not None and head_matmul_dtype(base, head) is None


def test_probabilities_are_kept_only_for_a_backward(monkeypatch):
    """Under no_grad (evaluation, DPO's reference) nothing is kept; with grad they are."""
    import torch
    from lorakit.fused_head import head_computes_nll

    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    targets = torch.randint(0, 50, (5,))
    kept = []
    exp = torch.exp

    def spy(*args, **kwargs):
        kept.append("out" in kwargs)  # the kept probabilities are written with out=
        return exp(*args, **kwargs)

    monkeypatch.setattr(torch, "exp", spy)
    with torch.no_grad(), head_computes_nll(head, targets):
        out = head(hidden)
    assert out.shape == (1, 5, 1) and not out.requires_grad and not any(kept)
    with head_computes_nll(head, targets):
        out = head(hidden)
    assert out.requires_grad and any(kept)
    assert "forward" not in vars(head)


@pytest.mark.parametrize("matmul_dtype", [None, "bfloat16"])
def test_a_second_backward_recomputes_what_the_first_used_up(matmul_dtype):
    import torch
    from lorakit.fused_head import HeadNLL

    low = getattr(torch, matmul_dtype) if matmul_dtype else None
    hidden, weight, _, targets, scale = _inputs("fp32", False, weight_grad=True)
    loss = (HeadNLL.apply(hidden, weight, None, targets, True, low) * scale).sum()
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_do():
    import torch
    from lorakit.fused_head import HeadNLL

    hidden, weight, _, targets, _ = _inputs("fp32", False, weight_grad=False)
    HeadNLL.apply(hidden, weight, None, targets).sum().backward()
    assert weight.grad is None and hidden.grad is not None
    expected = torch.autograd.grad(_unfused(hidden, weight, None, targets).sum(), hidden)[0]
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.mark.slow
def test_the_training_loss_is_the_unfused_loss_on_a_lora_model(tiny, compute_dtype):
    """supervised_nll with the fused head against the same model and batch with the head
    computing logits (fusing switched off): the loss and every LoRA gradient agree."""
    import torch
    from lorakit import fused_head
    from lorakit.loss import supervised_nll
    from lorakit.packing import pack
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, DTYPES[compute_dtype])
    base = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert fused_head.plain_head(model) is base.lm_head
    g = torch.Generator().manual_seed(3)
    rows = []
    for n in (9, 14, 6):
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    batch = pack(rows)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        nll, count = supervised_nll(model, batch)
        nll.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return nll.detach(), count, grads

    fused = loss_and_grads()
    # the model type off the list: the head computes logits and cross_entropy follows
    model.get_base_model().config.model_type = "not-listed"
    assert fused_head.plain_head(model) is None
    unfused = loss_and_grads()
    assert fused[1] == unfused[1] == sum(len(r["input_ids"]) - 3 for r in rows)
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-6, atol=1e-5)
    assert fused[2].keys() == unfused[2].keys() and len(fused[2]) == 28
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if compute_dtype == "fp32" else {}
    for name in fused[2]:
        torch.testing.assert_close(fused[2][name], unfused[2][name], **tolerance)
    assert "forward" not in vars(base.lm_head)  # the head is itself again after the forward


def test_a_ddp_wrapped_model_uses_the_fused_head(tiny, tmp_path):
    """torchrun's DDP wraps the model: the head is found through the wrapper (the forward still
    goes through DDP), so multi-process steps compute what one process computes."""
    import torch
    import torch.distributed as dist
    from lorakit.fused_head import plain_head
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(base)
        assert plain_head(wrapped) is base.lm_head
    finally:
        dist.destroy_process_group()


def test_heads_it_cannot_stand_in_for_keep_the_unfused_path(tiny):
    import torch
    from lorakit.fused_head import plain_head
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    assert plain_head(base) is base.lm_head
    base.lm_head.forward = lambda x: x  # somebody's hook (accelerate replaces forward)
    assert plain_head(base) is None
    del base.lm_head.forward
    # a LoRA adapter on the head itself: the head computes more than its weight
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    assert plain_head(model) is None
