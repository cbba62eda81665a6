"""Entry point: parse the verb, run it, turn domain errors into one or two lines + exit code.

Verb modules are imported lazily so ``--help``, ``plugins`` and ``check`` never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from lorakit import __version__
from lorakit.errors import LorakitError, printable
from lorakit.secrets import mask

# verb -> module under lorakit.cli, in the order --help lists them
VERBS = {
    "run": "run",
    "check": "check",
    "plan": "plan",
    "prepare": "prepare",
    "plugins": "plugins_cmd",
    "baseline": "baseline",
    "eval": "eval_cmd",
    "compare": "compare",
    "sweep": "sweep",
    "export": "export",
    "generate": "generate",
    "doctor": "doctor",
}


def _modules():
    for verb, mod in VERBS.items():
        try:
            yield verb, importlib.import_module(f"lorakit.cli.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"lorakit.cli.{mod}":
                raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="Fine-tune open LLMs with LoRA/QLoRA from a TOML recipe.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for _verb, module in _modules():
        module.add_parser(sub)
    for verb_parser in sub.choices.values():
        # Also accepted after the verb; SUPPRESS keeps `lorakit --debug VERB` from being reset.
        verb_parser.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show full tracebacks on errors",
        )
    return parser


def _quiet_libraries(verb: str | None) -> None:
    """Hide deprecation chatter from the training stack; --debug shows everything."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # bitsandbytes logs a missing optional CPU kernel package at import; the fallback works.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if verb != "check":  # check never forks: its tokenizer batches may use every core
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if extra:
        # KEY=VALUE overrides may also follow the options (run RECIPE --nproc 2 train.max_steps=5)
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    debug = args.debug or os.environ.get("LORAKIT_DEBUG") == "1"
    if not debug:
        _quiet_libraries(args.verb)
    if not args.verb:
        parser.print_help()
        return 2
    # progress bars on a terminal only: no carriage-return floods in logs and CI
    from lorakit.progress import quiet_libraries

    quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except LorakitError as exc:
        if debug:
            raise
        print(f"error: {mask(printable(str(exc)))}", file=sys.stderr)
        if not exc.fix and not getattr(exc, "problems", None):
            print("  (run with --debug for the traceback)", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        if debug or not _stdout_closed():
            raise  # another pipe (a logger's, a subprocess's) broke: a real error
        # the reader of stdout went away (lorakit plan RECIPE | head): no traceback; point
        # stdout at /dev/null so the interpreter's own flush at exit does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE
    except Exception as exc:
        from lorakit.diskfull import is_disk_full

        if debug or not is_disk_full(exc):
            raise
        where = getattr(exc, "filename", None) or "the run folder"
        print(
            f"error: the disk is full (or a file size limit was hit) while writing {where}: "
            f"{mask(printable(str(exc)))}\n  fix: free some space and run the command again",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _stdout_closed() -> bool:
    """Whether stdout's reader is gone: a write to it fails with a broken pipe."""
    try:
        sys.stdout.write("\n")  # buffered: the flush is what reaches the pipe
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    return False


if __name__ == "__main__":
    sys.exit(main())
