"""``lorakit run RECIPE [KEY=VALUE ...] [--resume-from-checkpoint PATH|auto]``."""

from __future__ import annotations

import sys

from lorakit.catalog import default_catalog
from lorakit.cli.common import add_recipe_args
from lorakit.cli.plan import add_memory_arg, capacity
from lorakit.components import build_components
from lorakit.recipe import load_recipe


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="train an adapter from a recipe")
    add_recipe_args(p)
    p.add_argument(
        "--resume-from-checkpoint",
        metavar="PATH|auto",
        help="continue a run from a checkpoint folder, or auto: its newest complete checkpoint",
    )
    add_memory_arg(p)
    p.add_argument(
        "--ignore-memory-plan",
        action="store_true",
        help="start even when `lorakit plan` predicts the run will not fit",
    )
    p.set_defaults(func=run)


def memory_preflight(args, recipe, components) -> None:
    """Print the plan's one-line summary; refuse to start when it predicts no fit."""
    from lorakit.errors import LorakitError, RunError
    from lorakit.memory_plan import gb
    from lorakit.preflight import fixes, plan_recipe, summary

    device, where, size = capacity(args, recipe)
    try:
        # The upper bound (batch x max_length tokens, all supervised) needs no data; only when it
        # does not fit is the data read for the real micro-batch size.
        plan, _note = plan_recipe(recipe, components, device, read_data=False)
        if size is not None and plan.peak > size:
            plan, _note = plan_recipe(recipe, components, device)
    except (LorakitError, ValueError) as exc:
        print(f"[lorakit] memory plan skipped: {exc}", file=sys.stderr, flush=True)
        return
    print(f"[lorakit] {summary(plan, size, where)}", file=sys.stderr, flush=True)
    if size is not None and plan.peak > size and not args.ignore_memory_plan:
        raise RunError(
            f"the memory plan predicts a peak of {gb(plan.peak)} (training {gb(plan.train_peak)},"
            f" generation {gb(plan.eval_peak)}) but {where} offers {gb(size)}",
            fix=f"try {fixes(plan)}; see `lorakit plan {args.recipe}`, or pass "
            "--ignore-memory-plan to start anyway",
        )


def run(args) -> int:
    from lorakit.runner import run_recipe

    catalog = default_catalog()
    recipe = load_recipe(args.recipe, args.overrides, catalog)
    components = build_components(recipe, catalog)
    memory_preflight(args, recipe, components)
    path = run_recipe(recipe, components, resume=args.resume_from_checkpoint)
    print(f"done: {path}")
    return 0
