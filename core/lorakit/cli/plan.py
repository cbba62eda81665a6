"""``lorakit plan RECIPE``: predict parameters and peak memory before anything is loaded.

Config only (``config.json``, GGUF metadata, or config.json fetched from the Hub); no torch,
unless ``--quant-gap`` asks to load the base and measure what its quantization costs.
"""

from __future__ import annotations

from lorakit.cli.common import add_memory_arg, add_recipe_args
from lorakit.session import open_session


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict parameters and peak memory without loading the model")
    add_recipe_args(p)
    add_memory_arg(p)
    p.add_argument(
        "--no-data",
        action="store_true",
        help="do not read the data: assume batch x max_length tokens, all supervised",
    )
    p.add_argument(
        "--quant-gap",
        nargs="?",
        type=int,
        const=16,
        metavar="N",
        help="also load the base unquantized and quantized and compare them on N val examples "
        "(default 16): loss, KL, top-1 agreement, and what to do when the gap is large",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from lorakit.memory_plan import gb, quantized_bytes, weight_bytes
    from lorakit.preflight import capacity, fixes, plan_recipe, summary

    session = open_session(args.recipe, args.overrides)
    recipe, components = session.recipe, session.components
    device, where, size = capacity(recipe, args.device_memory)
    plan, note = plan_recipe(recipe, components, device, read_data=not args.no_data)
    i, s = plan.inputs, plan.inputs.shape
    print(
        f"model: {s.model_type or 'decoder'} {s.layers} layers, hidden {s.hidden}, "
        f"intermediate {s.intermediate}, heads {s.heads}/{s.kv_heads} kv, vocab {s.vocab}"
        f"{', tied head' if s.tied else ''}"
    )
    print(
        f"parameters: {plan.total:,} total, {plan.trainable:,} trainable "
        f"({100 * plan.trainable / plan.total:.3f}%, r={i.r}, {i.targets})"
    )
    if plan.unmatched:
        print(f"  warning: target modules {plan.unmatched} match no linear layer of this layout")
    print(
        f"device: {device}, compute {i.dtype}; micro-batch {i.tokens} tokens, {i.supervised}"
        f" supervised ({note})"
    )
    print("base weights by quantization (linear layers; embeddings, head and norms unquantized):")
    chosen = (i.scheme, i.double_quant)
    for scheme, dq, label in (
        ("nf4", True, "NF4 + double quant"),
        ("nf4", False, "NF4"),
        ("fp4", True, "FP4 + double quant"),
        ("fp4", False, "FP4"),
        ("int8", False, "8-bit"),
        ("bf16", False, "bf16/fp16"),
        ("fp32", False, "fp32"),
    ):
        if scheme in ("bf16", "fp32"):
            n = quantized_bytes(s.total_params(), 0, scheme)
        else:
            n = weight_bytes(s, scheme, dq, i.dtype)
        unquantized = i.scheme == "none" and scheme == ("fp32" if i.dtype == "fp32" else "bf16")
        mark = "  <- recipe" if (scheme, dq) == chosen or unquantized else ""
        print(f"  {label:<20} {gb(n):>12}{mark}")
    other = "adamw_torch 8 B, adamw_8bit 2 B, sgd 0 B per trainable parameter"
    opt_note = "" if plan.optimizer_known else " (unknown optimizer: counted as AdamW)"
    ckpt_on, ckpt_off = (
        (plan.activations, plan.activations_other)
        if i.checkpointing
        else (plan.activations_other, plan.activations)
    )
    rows = [
        ("base weights", plan.weights, f"{i.scheme}{' + double quant' if i.double_quant else ''}"),
        ("LoRA weights", plan.lora, "fp32"),
        ("gradients", plan.grads, "fp32, LoRA only"),
        ("optimizer state", plan.optimizer, f"{i.optim}{opt_note}; {other}"),
        (
            "activations",
            plan.activations,
            f"checkpointing {'on' if i.checkpointing else 'off'}; "
            f"on: {gb(ckpt_on)}, off: {gb(ckpt_off)}",
        ),
        ("logits", plan.logits, "supervised positions only"),
        ("eval KV cache", plan.kv_cache, f"batch {i.eval_batch} x {i.eval_length} tokens"),
    ]
    if plan.dequant:
        rows.append(("dequant scratch", plan.dequant, "largest linear weight, one at a time"))
    if plan.runtime:
        rows.append(("runtime", plan.runtime, "Python + torch + libraries (CPU peak RSS)"))
    print("memory:")
    for name, n, why in rows:
        print(f"  {name:<18} {gb(n):>12}  {why}")
    print(f"  {'peak (training)':<18} {gb(plan.train_peak):>12}")
    print(f"  {'peak (generation)':<18} {gb(plan.eval_peak):>12}")
    if plan.runtime:
        print(
            "  (CPU: these are the live tensors. glibc's allocator keeps freed memory, so a "
            "run's peak RSS is higher, 1.6x to 3.5x as measured in docs/plan.md; "
            "LORAKIT_MALLOC=return makes it follow these terms, with slower steps)"
        )
    print(summary(plan, size, where))
    if args.quant_gap:  # loads the model (twice): torch only here
        from lorakit.console import say
        from lorakit.quant_gap import advice, run_gap

        gap = run_gap(session, args.quant_gap, say)
        for line in advice(gap, recipe.quant.name) if gap else []:
            print(line)
    if size is not None and plan.peak > size:
        print(f"to fit: {fixes(plan)}")
        return 1
    return 0
