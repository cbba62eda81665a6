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
from lorakit.errors import LorakitError

# verb -> module under lorakit.cli, in the order --help lists them
VERBS = {
    "run": "run",
    "check": "check",
    "prepare": "prepare",
    "plugins": "plugins_cmd",
    "baseline": "baseline",
    "eval": "eval_cmd",
    "compare": "compare",
    "export": "export",
    "generate": "generate",
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
    return parser


def _quiet_libraries() -> None:
    """Hide deprecation chatter from the training stack; --debug shows everything."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # bitsandbytes logs a missing optional CPU kernel package at import; the fallback works.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LORAKIT_DEBUG") == "1"
    if not debug:
        _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
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
        print(f"error: {exc}", file=sys.stderr)
        if not exc.fix and not getattr(exc, "problems", None):
            print("  (run with --debug for the traceback)", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
