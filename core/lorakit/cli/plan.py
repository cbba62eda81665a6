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


def _check_targets(plan) -> None:
    """Refuse a target_modules name that matches no module of the config's layout, as
    ``lorakit run`` refuses it once the model is loaded (where the layout is known)."""
    from lorakit.target_modules import (
        layout_linear_names,
        layout_module_names,
        target_modules_error,
        unmatched,
    )

    targets = plan.inputs.targets
    names = layout_module_names(plan.inputs.shape)
    if names is None or isinstance(targets, str):  # an unknown layout; "all-linear"
        return
    missing = unmatched(names, targets)
    if missing:
        raise target_modules_error(missing, layout_linear_names())


def run(args) -> int:
    from lorakit.memory_plan import gb
    from lorakit.preflight import (
        capacity,
        fixes,
        memory_terms,
        plan_recipe,
        summary,
        weights_by_scheme,
    )

    session = open_session(args.recipe, args.overrides)
    device, where, size = capacity(session.recipe, args.device_memory)
    plan, note = plan_recipe(session.recipe, session.components, device, read_data=not args.no_data)
    i, s = plan.inputs, plan.inputs.shape
    _check_targets(plan)
    print(
        f"model: {s.model_type or 'decoder'} {s.layers} layers, hidden {s.hidden}, "
        f"intermediate {s.intermediate}, heads {s.heads}/{s.kv_heads} kv, vocab {s.vocab}"
        f"{', tied head' if s.tied else ''}"
    )
    print(
        f"parameters: {plan.total:,} total, {plan.trainable:,} trainable "
        f"({100 * plan.trainable / plan.total:.3f}%, r={i.r}, {i.targets}"
        + (", train.from_adapter's own" if session.recipe.train.from_adapter else "")
        + ")"
    )
    if plan.unmatched:
        print(f"  warning: target modules {plan.unmatched} match no linear layer of this layout")
    print(
        f"device: {device}, compute {i.dtype}; micro-batch {i.tokens} tokens, {i.supervised}"
        f" supervised ({note})"
    )
    print("base weights by quantization (linear layers; embeddings, head and norms unquantized):")
    for label, n, chosen in weights_by_scheme(plan):
        print(f"  {label:<20} {gb(n):>12}{'  <- recipe' if chosen else ''}")
    print("memory:")
    for name, n, why in memory_terms(plan):
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
        for line in advice(gap, session.recipe.quant.name) if gap else []:
            print(line)
    if size is not None and plan.peak > size:
        print(f"to fit: {fixes(plan)}")
        return 1
    return 0
