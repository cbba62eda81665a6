"""The fused LoRA training forward computes PEFT's LoRA layer (``lorakit.fused_lora``)."""

from __future__ import annotations

import pytest
from helpers import build_tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def _lora_model(folder, dtype, fused: bool, **lora):
    import torch
    from lorakit.fast_dropout import use_fast_dropout
    from lorakit.fused_lora import use_fused_lora
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    torch.manual_seed(0)
    config = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "all-linear"}
    model = get_peft_model(base, LoraConfig(**{**config, **lora}))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0: give the adapter something to compute
            torch.nn.init.normal_(p, std=0.1)
    use_fast_dropout(model)
    swapped = use_fused_lora(model) if fused else 0
    return model.train(), swapped


def _step(model):
    """Logits and LoRA gradients of one seeded forward/backward (dropout masks included)."""
    import torch

    torch.manual_seed(1)
    ids = torch.randint(0, 300, (2, 20))
    logits = model(input_ids=ids).logits.float()
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("compute_dtype", ["fp32", "bf16"])
def test_fused_layers_compute_what_peft_computes(tiny, compute_dtype):
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[compute_dtype]
    (peft, _), (fused, swapped) = (_lora_model(tiny, dtype, f) for f in (False, True))
    assert swapped == 14  # 7 linear layers x 2 decoder layers
    ref_logits, ref_grads = _step(peft)
    logits, grads = _step(fused)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    if compute_dtype == "fp32":
        # same operations in the same order, same dropout masks: bit for bit
        assert logits.equal(ref_logits)
        assert all(grads[k].equal(ref_grads[k]) for k in grads)
        return
    # bf16: the fused path computes the rank-r product in bf16 (PEFT casts to fp32 and back):
    # outputs agree to a few bf16 ulps (2^-8 relative each), gradients to a few percent of
    # their largest element; the gradients stay fp32 tensors for the fp32 master weights
    assert (logits - ref_logits).abs().max() <= 4 * 2**-8 * ref_logits.abs().max()
    for k, g in grads.items():
        assert g.dtype == torch.float32
        assert (g - ref_grads[k]).abs().max() <= 0.1 * ref_grads[k].abs().max(), k


def test_layers_fall_back_to_peft_where_fusion_does_not_apply(tiny):
    """Eval mode, a disabled adapter and DoRA go through PEFT's own forward."""
    import torch

    model, swapped = _lora_model(tiny, torch.float32, True, use_dora=True)
    assert swapped == 14
    reference, _ = _lora_model(tiny, torch.float32, False, use_dora=True)
    assert _step(model)[0].equal(_step(reference)[0]), "DoRA: PEFT's forward"
    ids = torch.tensor([[3, 4, 5, 6]])
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert model(input_ids=ids).logits.equal(reference(input_ids=ids).logits)
        with model.disable_adapter(), reference.disable_adapter():
            assert model(input_ids=ids).logits.equal(reference(input_ids=ids).logits)


def _qlora_model(tmp_path, model_dir, chat_file, dtype: str, fused: bool, targets, ckpt=False):
    """The tiny model in 4 bits as lorakit loads and prepares it, LoRA on every linear layer."""
    tmp_path.mkdir()
    import torch
    from helpers import tiny_recipe
    from lorakit.catalog import default_catalog
    from lorakit.components import build_components
    from lorakit.fast_dropout import use_fast_dropout
    from lorakit.fused_lora import use_fused_lora
    from lorakit.modeling import load_base_model, resolve_model
    from lorakit.recipe import load_recipe
    from peft import LoraConfig, get_peft_model

    recipe = load_recipe(tiny_recipe(tmp_path, model_dir, chat_file, quant="bnb-4bit", dtype=dtype))
    parts = build_components(recipe, default_catalog())
    base = load_base_model(resolve_model(parts.model_source), parts.quant, "cpu")
    base = parts.quant.prepare_for_training(base, ckpt)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets)
    model = get_peft_model(base, config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    use_fast_dropout(model)
    if fused:
        use_fused_lora(model)
    return model.train()


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    """The tiny model with biases in every projection (as Qwen2 has in q/k/v)."""
    return build_tiny_model(tmp_path_factory.mktemp("biased"), biases=True)


@pytest.mark.parametrize(
    ("targets", "with_lora", "bare", "biases", "ckpt"),
    [
        ("all-linear", 14, 0, False, False),
        (["q_proj", "v_proj"], 4, 10, False, False),
        (["q_proj", "v_proj"], 4, 10, True, False),
        # gradient checkpointing: the layers run again in backward (torch stops a recompute
        # once it has what backward needs, so how many layers rerun is torch's business)
        (["q_proj", "v_proj"], 4, 10, False, True),
    ],
)
def test_fused_4bit_layers_compute_what_bitsandbytes_and_peft_compute(
    tmp_path, request, chat_file, compute_dtype, monkeypatch, targets, with_lora, bare, biases, ckpt
):
    """Over 4-bit layers the base matmul joins the LoRA node (``Lora4bit``), and layers without
    an adapter go through ``Base4bit``: the same conversions, dequantization and matmuls as
    bitsandbytes, so the outputs are bit for bit theirs in both compute dtypes (the bf16 base
    output converts to fp32 exactly). The input gradient is the same sum of the same terms,
    added in another order: fp32 rounding. Frozen biases are added as bitsandbytes adds them."""
    import torch
    from lorakit import fused_lora

    model_dir = request.getfixturevalue("biased" if biases else "tiny_model_dir")
    args = (model_dir, chat_file, compute_dtype)
    peft = _qlora_model(tmp_path / "a", *args, fused=False, targets=targets, ckpt=ckpt)
    fused = _qlora_model(tmp_path / "b", *args, fused=True, targets=targets, ckpt=ckpt)
    calls: list[str] = []
    for name in ("Lora4bit", "Base4bit"):
        cls = getattr(fused_lora, name)
        apply = cls.apply
        monkeypatch.setattr(cls, "apply", lambda *a, n=name, f=apply: calls.append(n) or f(*a))
    ref_logits, ref_grads = _step(peft)
    assert not calls
    logits, grads = _step(fused)
    counts = calls.count("Lora4bit"), calls.count("Base4bit")
    if ckpt:
        assert with_lora < counts[0] <= 2 * with_lora and bare < counts[1] <= 2 * bare
    else:
        assert counts == (with_lora, bare)
    assert logits.equal(ref_logits)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * with_lora
    for k, g in grads.items():
        assert g.dtype == torch.float32
        assert (g - ref_grads[k]).abs().max() <= 1e-5 * ref_grads[k].abs().max(), k


def test_shared_cast_converts_each_input_once_and_sees_changes():
    import torch
    from lorakit.fused_lora import _SharedCast

    cast = _SharedCast()
    x = torch.randn(3, 4)
    first = cast(x, torch.bfloat16)
    assert cast(x, torch.bfloat16) is first, "the same input: converted once"
    assert cast(x, torch.float32) is x
    x.add_(1.0)  # changed in place: converted again
    again = cast(x, torch.bfloat16)
    assert again is not first and again.equal(x.to(torch.bfloat16))
    y = x.clone()
    assert cast(y, torch.bfloat16) is not again
    with torch.inference_mode():
        z = torch.randn(3, 4)
    assert cast(z, torch.bfloat16).equal(z.to(torch.bfloat16)), "inference tensors: not cached"


@pytest.mark.parametrize("compute_dtype", ["fp32", "bf16"])
def test_training_arithmetic_without_dropout_is_the_step_less_its_dropout(tiny, compute_dtype):
    """What a DPO/KTO reference started from an adapter computes in a step
    (``lorakit.preference.StepReference``): the fused training forward with every dropout off,
    bit for bit; in bf16 not PEFT's eval forward (its LoRA branch rounds in fp32). The model's
    train/eval flags come back as they were."""
    import torch
    from lorakit.fast_dropout import FastDropout
    from lorakit.fused_lora import training_arithmetic_without_dropout

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[compute_dtype]
    model, _ = _lora_model(tiny, dtype, True)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    flags = [m.training for m in model.modules()]
    with torch.no_grad():
        with training_arithmetic_without_dropout(model):
            reference = model(input_ids=ids).logits
        assert [m.training for m in model.modules()] == flags
        drops = [m for m in model.modules() if isinstance(m, FastDropout)]
        assert drops and all(d.threshold for d in drops)
        kept = [d.threshold for d in drops]
        for d in drops:  # the training forward with dropout rate 0
            d.threshold = 0
        undropped = model(input_ids=ids).logits
        for d, t in zip(drops, kept, strict=True):
            d.threshold = t
        dropped = model(input_ids=ids).logits
        model.eval()
        peft_eval = model(input_ids=ids).logits
    assert reference.equal(undropped)
    assert not reference.equal(dropped), "dropout is really on in training"
    assert reference.equal(peft_eval) == (compute_dtype == "fp32")
