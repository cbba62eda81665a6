"""The output head and the cross-entropy as one autograd node, a slice of the vocabulary at a time.

The loss needs, at each supervised position, ``logsumexp(logits) - logits[target]``. Computed the
usual way (``lm_head`` then ``F.cross_entropy`` of ``logits.float()``) a step materializes the
logits in the compute dtype, their fp32 copy, the fp32 log-softmax, and in backward a zero-filled
fp32 gradient of the log-softmax, its backward and the cast back: on SmolLM2-135M (49,152 tokens
of vocabulary) five passes over ``positions x 49152`` elements, more operator time than the
head's matmul in a profiled bf16 step on an AMX CPU. Measured without the profiler, fusing them
makes a step about 3% faster (docs/performance.md); what it mostly saves is memory.

:class:`HeadNLL` computes the same per-position NLL from the hidden states: a block of positions
at a time, the head's matmul in the head's dtype (as ``lm_head`` does), the logits cast to fp32
(as ``logits.float()`` does), their logsumexp and the target's logit. It keeps the hidden
states, one fp32 logsumexp per position and, where they fit in 256 MB
(:data:`KEEP_ELEMENTS`), the fp32 probabilities; larger batches recompute each block's logits in
backward instead. Backward turns each block into ``softmax - onehot`` in place, scaled by the
incoming gradient, and multiplies back by the head's weight in its dtype: the gradient the
unfused path computes, without the vocabulary-wide temporaries. The fp32 logits, their
rounding and the reduction order within a row are the unfused path's, so the results agree to
fp32 rounding (``tests/test_fused_head.py``). A CPU QLoRA model's fp32 head computes in bf16
where its 4-bit layers do (:func:`head_matmul_dtype`): the weight converted once a forward,
each block's input as it goes.

:func:`head_computes_nll` makes a model's own head module return this NLL in place of logits for
one forward, so the model's forward (and anything wrapping the head module: hooks, sharding)
runs as usual. It applies only where the head is a plain ``nn.Linear`` and the model's forward
hands its output straight back (:data:`PLAIN_HEAD_MODELS`); elsewhere the caller keeps the
unfused path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from lorakit.memory_plan import HEAD_BLOCK_ELEMENTS, HEAD_KEEP_ELEMENTS, PLAIN_HEAD_MODELS

# PLAIN_HEAD_MODELS: the model types whose ``ForCausalLM.forward`` returns
# ``lm_head(hidden_states[:, keep])`` as the logits with nothing applied after it (no
# softcapping, logit scale or temperature), checked in transformers' source; a model type not
# listed keeps the unfused path.
# fp32 logits of one block: about 32 MB whatever the vocabulary
BLOCK_ELEMENTS = HEAD_BLOCK_ELEMENTS
# a forward whose probabilities fit in this many fp32 elements (256 MB) keeps them for backward;
# a larger one keeps only the logsumexp and recomputes the logits (one more head matmul)
KEEP_ELEMENTS = HEAD_KEEP_ELEMENTS


def _block_rows(vocab: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(vocab, 1))


class HeadNLL(torch.autograd.Function):
    """``-log_softmax(F.linear(hidden, weight, bias).float())[target]`` per position, in fp32."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: Any,
        targets: torch.Tensor,
        for_backward: bool = True,
        matmul_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        # the head's matmul in ``matmul_dtype`` (a CPU QLoRA model's fp32 head in bf16): the
        # weight converted once a forward and saved for backward (freed with the other saved
        # tensors), each block's input as it goes
        low = _converted(weight, bias, matmul_dtype)
        ctx.low = low is not None
        n, vocab = flat.shape[0], weight.shape[0]
        rows = _block_rows(vocab)
        nll = torch.empty(n, dtype=torch.float32, device=flat.device)
        lse = torch.empty_like(nll)
        # a recomputation in backward must see the logits this forward saw: under autocast
        # (fp16/bf16 mixed precision) the head's matmul is autocast's, not the weight's dtype
        device = flat.device.type
        ctx.autocast = (
            device,
            torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device),
        )
        # for_backward: autograd records this call (grad mode on); needs_input_grad alone is
        # also set under no_grad
        keep = for_backward and any(ctx.needs_input_grad[:3]) and n * vocab <= KEEP_ELEMENTS
        probs = torch.empty((n, vocab), dtype=torch.float32, device=flat.device) if keep else None
        for start in range(0, n, rows):
            end = start + rows
            logits = _linear(flat[start:end], weight, bias, low).float()
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[start:end, None]).squeeze(1)
            nll[start:end] = lse[start:end] - picked
            if probs is not None:
                torch.exp(logits.sub_(lse[start:end, None]), out=probs[start:end])
        ctx.save_for_backward(flat, weight, bias, targets, lse, *(low or (None, None)))
        ctx.hidden_shape = hidden.shape
        ctx.probs = probs  # used up by the first backward; a second one recomputes
        return nll

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        flat, weight, bias, targets, lse, low_weight, low_bias = ctx.saved_tensors
        low = (low_weight, low_bias) if ctx.low else None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.float()
        grad_h = torch.empty_like(flat) if need_h else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        grad_b = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        )
        kept, ctx.probs = ctx.probs, None
        rows = _block_rows(weight.shape[0])
        for start in range(0, flat.shape[0], rows):
            end = start + rows
            block = flat[start:end]
            # softmax - onehot, scaled by the incoming gradient: the gradient of the NLL
            if kept is not None:
                probs = kept[start:end]
            else:
                device, autocast, autocast_dtype = ctx.autocast
                with torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
                    probs = _linear(block, weight, bias, low).float()
                probs.sub_(lse[start:end, None]).exp_()
            index = torch.arange(probs.shape[0], device=probs.device)
            probs[index, targets[start:end]] -= 1.0
            probs.mul_(grad[start:end, None])
            w = weight if low is None else low[0]  # the weight the forward multiplied by
            if grad_h is not None:
                grad_h[start:end] = probs.to(w.dtype) @ w
            if grad_w is not None:
                # products of the bf16 values are exact in fp32: accumulate there, round once
                grad_w.addmm_(probs.to(w.dtype).t().float(), block.to(w.dtype).float())
            if grad_b is not None:
                grad_b += probs.sum(0)
        if grad_h is not None:
            grad_h = grad_h.view(ctx.hidden_shape)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def _converted(weight: torch.Tensor, bias: Any, dtype: torch.dtype | None) -> Any:
    """``(weight, bias)`` in ``dtype``, or None where the head computes in its own dtype."""
    if dtype is None or dtype == weight.dtype:
        return None
    return weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Any, low: Any) -> torch.Tensor:
    if low is None:
        return F.linear(x, weight, bias)
    return F.linear(x.to(low[0].dtype), *low)


def plain_head(model: Any) -> torch.nn.Linear | None:
    """The model's output head if :class:`HeadNLL` can stand in for it, else None."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module  # the forward still goes through DDP: gradients sync as before
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    # exactly nn.Linear: a LoRA/modules_to_save wrapper, a quantized or sharded (FSDP2) class
    # computes something else; an instance-level forward is somebody's hook (accelerate)
    if type(head) is not torch.nn.Linear or "forward" in vars(head):
        return None
    return head


def head_matmul_dtype(model: Any, head: torch.nn.Linear) -> torch.dtype | None:
    """bf16 for the fp32 head of a CPU QLoRA model whose 4-bit layers compute in bf16, else
    None (the head's own dtype).

    In QLoRA the weights bitsandbytes leaves unquantized stay fp32 (``bnb-4bit``), the head
    among them; on a CPU with fast bf16 its fp32 matmul would then cost a QLoRA step about a
    tenth more than the same step with LoRA, whose head is bf16 (docs/performance.md). Like the
    4-bit layers' matmuls, the head's then runs in bf16 with fp32 accumulation: its input and
    weight rounded to bf16, its logits to bf16 and then fp32, as a bf16 LoRA run's are.
    """
    from lorakit.fused_lora import bf16_4bit_layer, is_4bit_layer

    if head.weight.dtype != torch.float32 or head.weight.device.type != "cpu":
        return None
    for module in model.modules():
        if is_4bit_layer(module):
            return torch.bfloat16 if bf16_4bit_layer(module) else None
    return None


@contextlib.contextmanager
def head_computes_nll(
    head: torch.nn.Linear, targets: torch.Tensor, matmul_dtype: torch.dtype | None = None
) -> Iterator[None]:
    """For one forward, ``head`` returns the NLL of ``targets`` (fp32, one per position it is
    given, shaped ``[..., 1]``) instead of logits; with ``matmul_dtype`` its matmul runs in that
    dtype (:func:`head_matmul_dtype`)."""

    def nll_forward(hidden: torch.Tensor) -> torch.Tensor:
        nll = HeadNLL.apply(
            hidden,
            head.weight,
            head.bias,
            targets.reshape(-1),
            torch.is_grad_enabled(),
            matmul_dtype,
        )
        return nll.view(*hidden.shape[:-1], 1)

    head.forward = nll_forward  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        del head.forward
