"""Argument helpers shared by verbs."""

from __future__ import annotations

import argparse


def add_recipe_args(parser: argparse.ArgumentParser, help: str = "path to a TOML recipe") -> None:
    parser.add_argument("recipe", help=help)
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override recipe keys by path, e.g. train.max_steps=5 peft.r=8",
    )


def add_memory_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device-memory",
        metavar="SIZE",
        help="judge the fit against SIZE (e.g. 24GB) instead of the detected device",
    )
