"""``lorakit run RECIPE [KEY=VALUE ...] [--resume-from-checkpoint PATH|auto] [--nproc N ...]``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from lorakit.catalog import default_catalog
from lorakit.cli.common import add_recipe_args
from lorakit.cli.plan import add_memory_arg, capacity
from lorakit.components import build_components
from lorakit.console import say
from lorakit.recipe import load_recipe

# set by `lorakit run --nproc` for the processes it starts: the plan was checked once already
PREFLIGHT_DONE = "LORAKIT_MEMORY_PLAN_CHECKED"


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


def memory_preflight(args, recipe, components) -> None:
    """Print the plan's one-line summary; refuse to start when it predicts no fit."""
    from lorakit.errors import LorakitError, RunError
    from lorakit.memory_plan import gb
    from lorakit.preflight import fixes, plan_recipe, summary

    device, where, size = capacity(args, recipe)
    ranks = args.nproc or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device == "cpu" and size is not None and ranks > 1:
        size //= ranks  # processes on one machine share its memory
        where = f"{where} shared by {ranks} processes"
    try:
        # The upper bound (batch x max_length tokens, all supervised) needs no data; only when it
        # does not fit is the data read for the real micro-batch size.
        plan, _note = plan_recipe(recipe, components, device, read_data=False)
        if size is not None and plan.peak > size:
            plan, _note = plan_recipe(recipe, components, device)
    except (LorakitError, ValueError) as exc:
        say(f"memory plan skipped: {exc}")
        return
    say(summary(plan, size, where))
    if size is not None and plan.peak > size and not args.ignore_memory_plan:
        raise RunError(
            f"the memory plan predicts a peak of {gb(plan.peak)} (training {gb(plan.train_peak)},"
            f" generation {gb(plan.eval_peak)}) but {where} offers {gb(size)}",
            fix=f"try {fixes(plan)}; see `lorakit plan {args.recipe}`, or pass "
            "--ignore-memory-plan to start anyway",
        )


def run(args) -> int:
    from lorakit.launch import wants_launch

    catalog = default_catalog()
    if wants_launch(args):
        from lorakit.launch import check_launch, launch

        check_launch(args)
        # Once, in the launcher, before any process starts; the workers skip it.
        recipe = load_recipe(args.recipe, args.overrides, catalog)
        memory_preflight(args, recipe, build_components(recipe, catalog))
        os.environ[PREFLIGHT_DONE] = "1"
        return launch(args)

    from lorakit.distributed import is_main, lost_peer
    from lorakit.rundir import RunDir
    from lorakit.runner import run_recipe

    recipe = load_recipe(args.recipe, args.overrides, catalog)
    components = build_components(recipe, catalog)
    if os.environ.get(PREFLIGHT_DONE) != "1":
        memory_preflight(args, recipe, components)
    try:
        with terminate_like_ctrl_c():
            path = run_recipe(recipe, components, resume=args.resume_from_checkpoint)
    except KeyboardInterrupt:
        if is_main():
            _say_what_was_kept(RunDir(recipe.run_dir), args)
        raise
    except Exception as exc:
        # another rank was killed or crashed: one line here, the launcher names that rank
        stopped = lost_peer(exc)
        if stopped is None:
            raise
        raise stopped from exc
    finally:
        RunDir.release_all()  # the run folder's claim lasts as long as the run
    if is_main():
        print(f"done: {path}")
    return 0


@contextlib.contextmanager
def terminate_like_ctrl_c() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler's stop) ends the run the way Ctrl-C does: loggers closed
    as KILLED, what was kept and how to resume said, exit 130. Without this, Python's default
    SIGTERM ends the process at once, silently, with trackers left RUNNING."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or "LOCAL_RANK" in os.environ:
        yield  # under torchrun the launcher stops the ranks and reports (lorakit.launch)
        return

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _say_what_was_kept(run: Any, args: Any) -> None:
    import shlex

    done = run.complete_checkpoints() if run.exists() else []
    if not done:
        say(f"stopped before the first checkpoint: {run.path} will start again from step 0")
        return
    line = shlex.join(["lorakit", "run", str(args.recipe), *args.overrides])
    say(
        f"stopped; {run.path} keeps {done[-1].name} (its newest complete checkpoint); "
        f"continue with: {line} --resume-from-checkpoint auto"
    )
