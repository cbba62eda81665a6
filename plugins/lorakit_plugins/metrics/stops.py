"""``stops``: share of completions that ended with the template's end-of-turn token.

A model that never emits end-of-turn runs to ``max_new_tokens`` every time (the classic
pad == eos masking bug); this metric makes that visible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import attrs
from lorakit import hookimpl


@attrs.frozen
class NoOptions:
    """This metric takes no options."""


class Stops:
    """Fraction of generations that stopped within ``[eval].max_new_tokens``."""

    Options = NoOptions
    kind: ClassVar[str] = "generation"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, options: Any):
        self.options = options

    def score(
        self, predictions: Sequence[str], references: Sequence[str], stopped: Sequence[bool]
    ) -> float:
        return sum(map(bool, stopped)) / len(stopped) if stopped else float("nan")


@hookimpl
def lorakit_register_metrics(register):
    register("stops", Stops)
