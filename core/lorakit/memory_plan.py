"""Memory arithmetic for ``lorakit plan``: parameters and bytes from a model config, no weights.

Everything here is plain arithmetic on a decoder-only transformer of the Llama/Mistral layout
(embeddings, ``layers`` x [q,k,v,o projections, gate/up/down MLP, two norms], a final norm and an
LM head, possibly tied). Nothing imports torch.

Where the numbers come from:

- parameters: exact for that layout (Mistral-7B: 7,241,732,096; LoRA r=16 all-linear: 41,943,040).
- 4-bit weights (bitsandbytes): 0.5 byte per weight plus one fp32 absmax per 64-weight block,
  or with double quantization one 8-bit absmax per block plus one fp32 constant per 256 blocks.
  8-bit: one byte per weight plus an fp32 scale per output row. The LM head, the embeddings and
  the norms stay unquantized; k-bit preparation upcasts them to fp32.
- LoRA weights, their gradients and the optimizer state are fp32 (peft upcasts adapters).
- activations: bytes autograd keeps per token and layer, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` on lorakit's own forward (packed rows, varlen
  SDPA, LoRA dropout on every linear layer), fitted as a linear function of the hidden,
  intermediate and key/value widths (``benchmarks/fit_activations.py``) for fp32, bf16, and
  bf16 over a k-bit base (QLoRA: an fp32 residual stream); with gradient checkpointing only each
  layer's input is kept, plus one layer recomputed during backward.
- logits: only at supervised positions (``logits_to_keep``): the fp32 log-softmax kept for
  backward, its gradient and the gradient of the logits; a CPU 4-bit model computing in bf16
  adds the head weight's bf16 copy (:func:`head_copy_bytes`).
- k-bit dequantization scratch: a 4/8-bit layer dequantizes its weight to the compute dtype for
  each matmul (forward and backward) and frees it after, so one copy of the largest linear
  weight is live at a time (235 MB in fp32 for Mistral-7B's MLP, 3.5 MB for SmolLM2-135M).
- runtime (CPU only): Python, torch and the libraries, measured.

What a CPU run's peak RSS holds besides tensors, measured stage by stage with
``benchmarks/memory_stages.py`` (VmHWM reset per stage, glibc ``mallinfo2``, saved-tensor bytes):
with glibc's default malloc, freed activations and temporaries are kept in the heap instead of
going back to the OS (2.0 GB free-but-kept after one forward pass of 1458 tokens on SmolLM2-135M,
4.3 GB after backward, against 2.3 GB of saved activations), so peak RSS was 5.6 GB where the
live tensors peaked at 3.6 GB. With ``LORAKIT_MALLOC=return``, ``lorakit run`` fixes glibc's
mmap threshold on CPU (``lorakit.device.return_freed_memory``): every tensor of 128 KiB or more
is unmapped when freed, and peak RSS follows the live tensors counted here. It is opt-in because
the page faults slow a step down; with glibc's default (and lorakit's default on CPU,
``LORAKIT_MALLOC=keep``: glibc with larger thresholds) the peak RSS is not modelled here. The saved-tensor fit matches the
count within 2% there (2387 MiB counted, 2353 predicted). Unquantized weights are memory-mapped from the
safetensors file: they join RSS as the first forward pass touches them, not at load, and loading
(the cached folder, no conversion) never sets the peak. A 4/8-bit model reads the whole file
while quantizing; its unquantized tensors would stay views of the mapping and keep those pages
(405 MiB of SmolLM2's 513 MiB) in RSS all run, so ``lorakit.modeling.release_weights_file``
copies them out and the file's pages leave; the quantization's temporaries are chunk-sized
(``lorakit.quantize_cpu``) and go back to the OS when freed (``lorakit.device.loading_memory``),
where the heap of ``LORAKIT_MALLOC=keep`` had kept up to 6x the live tensors. Attention adds no ``L x L`` term: on CPU, SDPA
(``is_causal``, grouped KV heads included) runs PyTorch's flash kernel, which saves queries,
keys, values, output and a log-sum-exp per row, linear in the example length. A run with one of glibc's ``MALLOC_*``
variables set keeps its own allocator settings and is not covered by this model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

GiB = 2**30
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Python + torch + transformers + peft + bitsandbytes + lorakit imported, before any model:
# measured peak RSS on CPU (benchmarks/bench_plan.py prints it again). Only CPU runs count it.
CPU_RUNTIME_BYTES = int(0.47 * GiB)

# Optimizer state bytes per trainable parameter (transformers' `optim` names).
OPTIMIZER_BYTES: dict[str, float] = {
    "adamw_torch": 8,
    "adamw_torch_fused": 8,
    "adamw_hf": 8,
    "adamw_apex_fused": 8,
    "adamw_torch_xla": 8,
    "adam": 8,
    "adamw_bnb_8bit": 2,
    "adamw_8bit": 2,
    "paged_adamw_8bit": 2,
    "paged_adamw_32bit": 8,
    "paged_adamw": 8,
    "adamw_anyprecision": 8,
    "lion_8bit": 1,
    "paged_lion_8bit": 1,
    "lion_32bit": 4,
    "paged_lion_32bit": 4,
    "adagrad": 4,
    "rmsprop": 4,
    "adafactor": 0.1,  # factored second moments: ~(rows + cols) per matrix, tiny for LoRA
    "sgd": 0,
}

# Saved-for-backward bytes per token per decoder layer (see module docstring):
# a_hidden * hidden + a_inter * intermediate + a_kv * kv_width + constant, by compute dtype
# bytes and whether the base is k-bit (its residual stream, norms and MLP activations stay
# fp32). Fitted by benchmarks/fit_activations.py (2026-12-07, exact on its five shapes; rows
# of 200-token examples): fp32 is the same with or without a k-bit base. In bf16 the constant
# held each layer's copy of the example's attention mask (2 bytes per key: 400 at 200 tokens);
# since the masks are kept once a row for all layers (attention._RowMasks, fitted before it),
# a bf16 plan counts that ~1% more than a run keeps: erring high, not refitted. Examples under
# 96 tokens keep fp32 q, k, v and output instead of bf16 (about +7% at a 4096 hidden size).
_ACT = {
    (4, False): (46.06, 17.0, 8.0, 456.0),
    (4, True): (46.06, 17.0, 8.0, 456.0),
    (2, False): (26.42, 9.12, 4.08, 632.0),
    (2, True): (42.06, 17.0, 4.0, 856.0),
}
# With gradient checkpointing: the layer input (and a byte of bookkeeping) per token and layer,
# by the residual stream's bytes (fp32 over a k-bit base).
_ACT_CKPT = {4: 5.0, 2: 3.0}


@attrs.frozen
class ModelShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = ""

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of the linear layers of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return [
            ("q_proj", h, self.q_width),
            ("k_proj", h, self.kv_width),
            ("v_proj", h, self.kv_width),
            ("o_proj", self.q_width, h),
            ("gate_proj", h, i),
            ("up_proj", h, i),
            ("down_proj", i, h),
        ]

    def linear_weights(self) -> int:
        """Weights of every decoder-layer linear layer (what 4/8-bit quantization converts)."""
        return self.layers * sum(a * b for _, a, b in self.linears())

    def linear_rows(self) -> int:
        return self.layers * sum(b for _, _, b in self.linears())

    def other_params(self) -> int:
        """Embeddings, LM head (unless tied), norms and biases: kept unquantized."""
        biases = (self.q_width + 2 * self.kv_width) if self.attention_bias else 0
        if self.mlp_bias:
            biases += 2 * self.intermediate + self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return (
            self.vocab * self.hidden + head + self.layers * (2 * self.hidden + biases) + self.hidden
        )

    def total_params(self) -> int:
        return self.linear_weights() + self.other_params()


def _int(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"config has no positive integer {key!r}")
    return value


def shape_from_config(config: Mapping[str, Any]) -> ModelShape:
    """A :class:`ModelShape` from a transformers ``config.json`` dict (Llama-style keys)."""
    if isinstance(config.get("text_config"), Mapping):
        config = {**config["text_config"], "tie_word_embeddings": config.get("tie_word_embeddings")}
    hidden, heads = _int(config, "hidden_size"), _int(config, "num_attention_heads")
    head_dim = config.get("head_dim") or hidden // heads
    return ModelShape(
        vocab=_int(config, "vocab_size"),
        hidden=hidden,
        intermediate=_int(config, "intermediate_size"),
        layers=_int(config, "num_hidden_layers"),
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=int(head_dim),
        tied=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        model_type=str(config.get("model_type", "")),
    )


def lora_params(
    shape: ModelShape, r: int, targets: str | Sequence[str], dora: bool = False
) -> tuple[int, list[str]]:
    """Trainable LoRA parameters and the target names that match no linear layer.

    ``"all-linear"`` is every linear layer but the LM head (peft's rule). A listed name matches
    a layer whose name equals it or ends with ``.<name>``.
    """
    names = set(LINEAR_NAMES) if targets == "all-linear" else set(targets)
    per_layer = 0
    for name, fan_in, fan_out in shape.linears():
        if name in names or any(t.endswith("." + name) for t in names):
            per_layer += r * (fan_in + fan_out) + (fan_out if dora else 0)
    known = set(LINEAR_NAMES) | {t for t in names if t.rsplit(".", 1)[-1] in LINEAR_NAMES}
    unmatched = sorted(names - known) if targets != "all-linear" else []
    return shape.layers * per_layer, unmatched


def quantized_bytes(n_weights: int, n_rows: int, scheme: str, double_quant: bool = False) -> int:
    """Bytes of ``n_weights`` linear weights (``n_rows`` output rows) stored as ``scheme``."""
    if scheme in ("nf4", "fp4"):
        blocks = n_weights / 64
        absmax = blocks * 1 + blocks / 256 * 4 if double_quant else blocks * 4
        return int(n_weights / 2 + absmax)
    if scheme == "int8":
        return n_weights + 4 * n_rows
    return n_weights * DTYPE_BYTES[scheme]


def weight_bytes(shape: ModelShape, scheme: str, double_quant: bool, dtype: str) -> int:
    """The base model's bytes: linear weights as ``scheme``, the rest in ``dtype`` (fp32 after
    k-bit preparation)."""
    rest = "fp32" if scheme in ("nf4", "fp4", "int8") else dtype
    linear = quantized_bytes(
        shape.linear_weights(),
        shape.linear_rows(),
        dtype if scheme == "none" else scheme,
        double_quant,
    )
    return linear + shape.other_params() * DTYPE_BYTES[rest]


def optimizer_bytes(optim: str, trainable: int) -> tuple[int, bool]:
    """Optimizer state bytes and whether ``optim`` is known (unknown: AdamW's 8 bytes)."""
    per = OPTIMIZER_BYTES.get(optim)
    return int(trainable * (8 if per is None else per)), per is not None


def activation_bytes(
    shape: ModelShape, tokens: int, elem: int, checkpointing: bool, kbit: bool = False
) -> int:
    """Bytes kept for backward for a micro-batch of ``tokens`` packed tokens; ``kbit``: over a
    4/8-bit base, whose residual stream stays fp32 whatever the compute dtype."""
    wide = 4 if elem >= 4 else 2
    a_h, a_i, a_kv, c = _ACT[(wide, kbit)]
    per_layer = a_h * shape.hidden + a_i * shape.intermediate + a_kv * shape.kv_width + c
    if checkpointing:
        kept = shape.layers * tokens * (_ACT_CKPT[4 if kbit else wide] * shape.hidden + 1)
        return int(kept + tokens * per_layer)  # plus one layer recomputed in backward
    return int(shape.layers * tokens * per_layer)


# The fused head (lorakit.fused_head): the model types whose head computes the NLL itself, a
# block of positions at a time (about HEAD_BLOCK_ELEMENTS fp32 logits), keeping the fp32
# probabilities for backward when they fit in HEAD_KEEP_ELEMENTS (256 MB). Here, not in
# fused_head, so that planning does not import torch.
PLAIN_HEAD_MODELS = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo", "olmo2", "smollm3"}
)
HEAD_BLOCK_ELEMENTS = 1 << 23
HEAD_KEEP_ELEMENTS = 1 << 26


def logits_bytes(shape: ModelShape, supervised: int, elem: int) -> int:
    """Logits work at ``supervised`` positions. Fused head: the kept fp32 probabilities (when
    they fit) and one block's logits in the compute dtype, in fp32 and the block's softmax.
    Otherwise the whole logits: fp32 log-softmax, its gradient, the logits' gradient."""
    everything = supervised * shape.vocab
    if shape.model_type in PLAIN_HEAD_MODELS:
        kept = 4 * everything if everything <= HEAD_KEEP_ELEMENTS else 0
        block = min(everything, max(HEAD_BLOCK_ELEMENTS, shape.vocab))
        return int(kept + block * (elem + 4 + 4))
    return int(everything * (4 + 4 + 4 + (elem if elem != 4 else 0)))


def head_copy_bytes(shape: ModelShape, scheme: str, dtype: str, cpu: bool) -> int:
    """A CPU 4-bit model computing in bf16: the fused head converts the fp32 head weight to
    bf16 once a forward and keeps it until the backward (``fused_head.head_matmul_dtype``)."""
    four_bit = scheme in ("nf4", "fp4")
    if not (cpu and four_bit and dtype == "bf16" and shape.model_type in PLAIN_HEAD_MODELS):
        return 0
    return shape.vocab * shape.hidden * 2


def dequant_bytes(shape: ModelShape, scheme: str, elem: int) -> int:
    """The largest linear weight dequantized to the compute dtype (k-bit layers only): live
    during one matmul at a time, forward or backward."""
    if scheme not in ("nf4", "fp4", "int8"):
        return 0
    return max(a * b for _, a, b in shape.linears()) * elem


def kv_cache_bytes(shape: ModelShape, batch: int, length: int, elem: int) -> int:
    """Keys and values of every layer for ``batch`` sequences of ``length`` tokens."""
    return 2 * shape.layers * shape.kv_width * elem * batch * length


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``24GB`` / ``24GiB`` / ``512MB`` -> bytes (GB and GiB both mean 2**30, like nvidia-smi).
    A bare number is refused: ``24`` would be 24 bytes, never what was meant."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a memory size; write e.g. 24GB or 512MB")
    if not m.group(2) and not text.strip().upper().endswith("B"):
        raise ValueError(f"{text!r} has no unit; write e.g. {text.strip()}GB or {text.strip()}MB")
    power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * 1024**power)


@attrs.frozen
class PlanInputs:
    """Everything the arithmetic needs, gathered from a recipe (see ``lorakit.preflight``)."""

    shape: ModelShape
    r: int
    targets: str | tuple[str, ...]
    dora: bool
    scheme: str  # "nf4", "fp4", "int8" or "none"
    double_quant: bool
    dtype: str  # compute dtype: "fp32", "bf16" or "fp16"
    optim: str
    checkpointing: bool
    tokens: int  # packed tokens in the largest micro-batch
    supervised: int  # supervised positions in it (logits are computed only there)
    eval_batch: int
    eval_length: int  # prompt + generated tokens
    cpu: bool  # CPU runs: peak RSS includes the Python/torch runtime
    # a step's micro-batches merged up to this many tokens, which sets ``tokens`` (0: not)
    merged: int = 0


@attrs.frozen
class Plan:
    inputs: PlanInputs
    total: int
    trainable: int
    unmatched: list[str]
    weights: int
    lora: int
    grads: int
    optimizer: int
    optimizer_known: bool
    activations: int
    activations_other: int  # with the other gradient-checkpointing setting
    logits: int
    kv_cache: int
    dequant: int
    runtime: int
    train_peak: int
    eval_peak: int

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.eval_peak)


def make_plan(i: PlanInputs) -> Plan:
    """Predict every term and the peak (training step or generation, whichever is larger)."""
    s, elem = i.shape, DTYPE_BYTES[i.dtype]
    trainable, unmatched = lora_params(s, i.r, i.targets, i.dora)
    weights = weight_bytes(s, i.scheme, i.double_quant, i.dtype)
    lora, grads = 4 * trainable, 4 * trainable
    optimizer, known = optimizer_bytes(i.optim, trainable)
    # an 8-bit base keeps fp32 activations and attention whatever the compute dtype (only the
    # 4-bit layers move attention to bf16): counted as fp32, not measured
    kbit = i.scheme in ("nf4", "fp4")
    act_elem = 4 if i.scheme == "int8" else elem
    act = activation_bytes(s, i.tokens, act_elem, i.checkpointing, kbit)
    other = activation_bytes(s, i.tokens, act_elem, not i.checkpointing, kbit)
    logits = logits_bytes(s, i.supervised, elem) + head_copy_bytes(s, i.scheme, i.dtype, i.cpu)
    kv = kv_cache_bytes(s, i.eval_batch, i.eval_length, elem)
    dequant = dequant_bytes(s, i.scheme, elem)
    runtime = CPU_RUNTIME_BYTES if i.cpu else 0
    resident = weights + lora + optimizer + runtime + dequant
    train_peak = resident + grads + act + logits
    # generation: the KV cache and one step's fp32 logits for the batch
    eval_peak = resident + kv + i.eval_batch * s.vocab * 4 * 2
    return Plan(
        inputs=i,
        total=s.total_params() + trainable,
        trainable=trainable,
        unmatched=unmatched,
        weights=weights,
        lora=lora,
        grads=grads,
        optimizer=optimizer,
        optimizer_known=known,
        activations=act,
        activations_other=other,
        logits=logits,
        kv_cache=kv,
        dequant=dequant,
        runtime=runtime,
        train_peak=train_peak,
        eval_peak=eval_peak,
    )


def gb(n: float) -> str:
    return f"{n / GiB:.2f} GB"
