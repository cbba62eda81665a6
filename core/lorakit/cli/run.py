"""``lorakit run RECIPE [KEY=VALUE ...] [--resume-from-checkpoint PATH|auto] [--nproc N ...]``."""

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
    g = p.add_argument_group(
        "several processes (started through torchrun; docs/distributed.md)",
    )
    g.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="training processes on this machine: one per GPU; on CPU they share the cores",
    )
    g.add_argument("--nnodes", type=int, default=1, metavar="M", help="machines in the job")
    g.add_argument(
        "--node-rank", type=int, default=0, metavar="K", help="this machine's number, 0 to M-1"
    )
    g.add_argument(
        "--master-addr",
        default="127.0.0.1",
        metavar="HOST",
        help="address of the machine with node rank 0 (several machines)",
    )
    g.add_argument(
        "--master-port",
        type=int,
        metavar="PORT",
        help="free port on that machine (default: any free port on one machine, 29500 on several)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from lorakit.launch import wants_launch

    if wants_launch(args):
        from lorakit.launch import launch

        return launch(args)

    from lorakit.distributed import is_main
    from lorakit.runner import run_recipe

    catalog = default_catalog()
    recipe = load_recipe(args.recipe, args.overrides, catalog)
    path = run_recipe(recipe, catalog, resume=args.resume_from_checkpoint)
    if is_main():
        print(f"done: {path}")
    return 0
