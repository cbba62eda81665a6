"""``lorakit run RECIPE [KEY=VALUE ...] [--resume-from-checkpoint PATH|auto]``."""

from __future__ import annotations

from lorakit.cli.common import add_recipe_args
from lorakit.plugins import default_catalog
from lorakit.recipe import load_recipe


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="train an adapter from a recipe")
    add_recipe_args(p)
    p.add_argument(
        "--resume-from-checkpoint",
        metavar="PATH|auto",
        help="continue a run from a checkpoint folder, or auto: its newest complete checkpoint",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from lorakit.rundir import RunDir
    from lorakit.runner import run_recipe

    catalog = default_catalog()
    recipe = load_recipe(args.recipe, args.overrides, catalog)
    try:
        path = run_recipe(recipe, catalog, resume=args.resume_from_checkpoint)
    finally:
        RunDir.release_all()  # the run folder's claim lasts as long as the run
    print(f"done: {path}")
    return 0
