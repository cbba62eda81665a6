"""``lorakit run RECIPE [KEY=VALUE ...] [--resume-from-checkpoint PATH|auto] [--nproc N ...]``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from lorakit.cli.common import add_memory_arg, add_recipe_args
from lorakit.console import say


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


def run(args) -> int:
    from lorakit.launch import wants_launch
    from lorakit.preflight import PREFLIGHT_DONE, check_memory
    from lorakit.session import open_session

    launcher = wants_launch(args)
    if launcher:
        from lorakit.launch import check_launch, launch

        check_launch(args)
    session = open_session(args.recipe, args.overrides)
    recipe = session.recipe
    # Once, in the launcher, before any process starts; the processes it starts skip it.
    if launcher or os.environ.get(PREFLIGHT_DONE) != "1":
        check_memory(
            recipe,
            session.components,
            device_memory=args.device_memory,
            processes=args.nproc,
            ignore=args.ignore_memory_plan,
            recipe_arg=args.recipe,
            resuming=args.resume_from_checkpoint is not None,
        )
    if launcher:
        os.environ[PREFLIGHT_DONE] = "1"
        return launch(args)

    from lorakit.distributed import is_main, lost_peer
    from lorakit.rundir import RunDir
    from lorakit.runner import run_recipe

    try:
        with terminate_like_ctrl_c():
            path = run_recipe(recipe, session.components, resume=args.resume_from_checkpoint)
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
