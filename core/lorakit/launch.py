"""``lorakit run --nproc N``: start N training processes through torchrun (torch.distributed.run).

This is torchrun itself, called in this process with the arguments one would type: its agent
starts ``python -m lorakit.cli.main run RECIPE ...`` once per rank, sets RANK/LOCAL_RANK/
WORLD_SIZE/MASTER_ADDR/MASTER_PORT, and stops every rank when one fails. lorakit adds three
things: the recipe is checked once before any process starts, each rank gets its share of the
cores (``OMP_NUM_THREADS``, unless you set it), and a failed rank is reported in one line that
says which rank, how it ended, and how to continue.
"""

from __future__ import annotations

import os
from typing import Any

from lorakit.errors import RunError

WORKER = ("-m", "lorakit.cli.main", "run")
DEFAULT_PORT = 29500


def wants_launch(args: Any) -> bool:
    return args.nproc is not None or args.nnodes != 1


def worker_argv(args: Any) -> list[str]:
    """The ``lorakit run`` line each rank runs (the launcher's own options left out)."""
    argv = [*WORKER, str(args.recipe), *args.overrides]
    if args.resume_from_checkpoint:
        argv += ["--resume-from-checkpoint", args.resume_from_checkpoint]
    if args.debug:
        argv.append("--debug")
    return argv


def torchrun_argv(args: Any) -> list[str]:
    nproc = args.nproc or 1
    if args.nnodes == 1 and args.master_port is None:
        # one machine: torchrun picks a free port itself
        head = ["--standalone", "--nnodes", "1"]
    else:
        head = [
            "--nnodes",
            str(args.nnodes),
            "--node-rank",
            str(args.node_rank),
            "--master-addr",
            args.master_addr,
            "--master-port",
            str(master_port(args)),
        ]
    return [*head, "--nproc-per-node", str(nproc), "--max-restarts", "0", *worker_argv(args)]


def master_port(args: Any) -> int:
    """``--master-port``, or torchrun's usual 29500 when it is not given (several machines)."""
    return DEFAULT_PORT if args.master_port is None else int(args.master_port)


def check_launch(args: Any) -> None:
    """Refuse launcher options that cannot work here (already under a launcher, bad counts)."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        raise RunError(
            "--nproc/--nnodes start torchrun, but this process already runs under a launcher",
            fix="leave out --nproc/--nnodes/--node-rank when you start lorakit with torchrun or "
            "accelerate launch",
        )
    problems = []
    if args.nproc is not None and args.nproc < 1:
        problems.append(f"--nproc {args.nproc}: give 1 or more processes")
    if args.nnodes < 1:
        problems.append(f"--nnodes {args.nnodes}: give 1 or more machines")
    if not 0 <= args.node_rank < max(args.nnodes, 1):
        problems.append(f"--node-rank {args.node_rank}: give 0 to {args.nnodes - 1}")
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        problems.append(
            f"--master-port {args.master_port}: give a TCP port from 1 to 65535 (leave it out "
            f"for any free port on one machine, {DEFAULT_PORT} on several)"
        )
    if problems:
        raise RunError("; ".join(problems), fix="see lorakit run --help")


def threads_per_rank(nproc: int) -> int:
    from lorakit.device import usable_cores

    return max(1, usable_cores() // max(1, nproc))


def launch(args: Any) -> int:
    """Run the recipe in ``--nproc`` processes (on ``--nnodes`` machines); return the exit code.
    The caller (``lorakit run``) has checked ``args`` (:func:`check_launch`) and the recipe
    once, here in the launcher, before any process starts."""
    nproc = args.nproc or 1
    # torchrun would give each rank 1 thread; lorakit gives each its share of this machine
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(torchrun_argv(args)))
    except ChildFailedError as exc:
        raise _failure(exc, args) from None
    return 0


def first_failure(failures: dict[int, Any]) -> int:
    """The rank whose failure stopped the job.

    A rank that stopped because another one failed exits with ``RankStopped``'s code; it may
    end before torchrun notices the rank that was killed, and torchrun's own pick (the earliest
    failure, to the second) would then name it. Ranks that followed come last; then the earliest.
    """
    from lorakit.distributed import RankStopped

    order = list(failures)  # torchrun records failures as it sees them
    return min(
        order,
        key=lambda r: (
            failures[r].exitcode == RankStopped.exit_code,
            failures[r].timestamp,
            order.index(r),
        ),
    )


def _failure(exc: Any, args: Any) -> RunError:
    rank = first_failure(exc.failures)
    failure = exc.failures[rank]
    if failure.exitcode < 0:
        how = f"was killed by {failure.signal_name()}"
    else:
        how = f"exited with code {failure.exitcode}"
        if failure.exitcode == 2:
            how += " (its error is printed above)"
    others = len(exc.failures) - 1
    stopped = f"; the other {others} rank(s) on this machine stopped with it" if others else ""
    return RunError(
        f"rank {rank} (pid {failure.pid}) {how}{stopped}",
        fix=f"fix the cause, then continue from the last complete checkpoint: {resume_line(args)}"
        " (or start it again if no checkpoint was written)",
    )


def resume_line(args: Any) -> str:
    """The command that continues this launch (same recipe, overrides and processes), quoted
    for a POSIX shell."""
    import shlex

    line = ["lorakit", "run", str(args.recipe), *args.overrides, "--nproc", str(args.nproc or 1)]
    if args.nnodes > 1:
        line += ["--nnodes", str(args.nnodes), "--node-rank", str(args.node_rank)]
        line += ["--master-addr", args.master_addr, "--master-port", str(master_port(args))]
    return shlex.join([*line, "--resume-from-checkpoint", "auto"])
