"""``sweep.toml``: what ``lorakit sweep`` searches, read and checked (no optuna, no torch).

::

    [sweep]
    trials = 8                 # trials in the study, all processes together
    pruner = "hyperband"       # or "successive_halving", "median", "off"

    [space."train.learning_rate"]
    low = 1e-5
    high = 1e-3
    log = true

    [space."peft.r"]
    choices = [4, 8, 16]

Each ``[space."KEY"]`` is a recipe key as ``KEY=VALUE`` overrides name it, with ``choices``
(a list), or ``low`` and ``high`` (integers: an integer range, ``step`` optional; else a float
range, ``log`` optional). ``data.*`` keys cannot be searched: every trial trains and is scored
on the same prepared splits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import attrs
from attrs import validators as v

from lorakit.errors import RecipeError
from lorakit.options import option, structure
from lorakit.recipe_toml import read_toml

PRUNERS = ("hyperband", "successive_halving", "median", "off")


def _study_name(value: str) -> None:
    """A study's folder is a name under output.dir, as a run's is."""
    from lorakit.sections import run_name_problem

    problem = run_name_problem(value) if value else None
    if problem:
        raise ValueError(problem)


@attrs.frozen
class SweepSection:
    trials: int = option(8, doc="trials in the study, all processes together", validator=v.ge(1))
    name: str = option(
        "",
        doc="the study and its folder under output.dir (empty: <recipe>-sweep)",
        validator=lambda _inst, _attribute, value: _study_name(value),
    )
    metric: str = option(
        "", doc="what ranks trials (empty: the recipe's first [eval] metric, else eval_loss)"
    )
    split: str = option("", doc="the split that metric is read on (empty: [eval].splits[0])")
    pruner: Literal["hyperband", "successive_halving", "median", "off"] = option(
        "hyperband", doc="stops trials whose eval loss lags at the same step"
    )
    reduction_factor: int = option(3, doc="pruner: keep 1/N of trials per rung", validator=v.ge(2))
    sampler: Literal["tpe", "random"] = option("tpe", doc="how the next trial's values are drawn")
    seed: int = option(0, doc="the sampler's seed")


@attrs.frozen
class Param:
    """One searched recipe key."""

    key: str
    choices: tuple[Any, ...] = ()
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def corners(self) -> list[Any]:
        """Values that reach every kind of value the key can take (for checking the recipe)."""
        return list(self.choices) if self.choices else [self.low, self.high]


@attrs.frozen
class SweepSpec:
    sweep: SweepSection
    space: tuple[Param, ...]
    path: Path


def read_space(path: str | Path) -> SweepSpec:
    """``sweep.toml`` checked: every problem at once, each with its key path, as a RecipeError."""
    path = Path(path)
    _, data = read_toml(path)
    problems: list[str] = []
    extra = sorted(set(data) - {"sweep", "space"})
    problems += [f"[{k}]: unknown table; a sweep file has [sweep] and [space]" for k in extra]
    section, found = structure(SweepSection, data.get("sweep", {}), "[sweep]")
    problems += found
    space = data.get("space", {})
    params: list[Param] = []
    if not isinstance(space, dict) or not space:
        problems.append('[space]: name at least one recipe key, e.g. [space."peft.r"]')
        space = {}
    for key, table in space.items():
        param, problem = _param(key, table)
        if problem:
            problems.append(f'[space."{key}"]: {problem}')
        elif param is not None:
            params.append(param)
    if problems:
        raise RecipeError(problems, source=str(path))
    assert section is not None
    return SweepSpec(sweep=section, space=tuple(params), path=path)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _param(key: str, table: Any) -> tuple[Param | None, str | None]:
    if key.split(".")[0] == "data":
        return None, "data keys cannot be searched: every trial uses the same prepared splits"
    if not isinstance(table, dict):
        return None, "expected a table: choices = [...], or low = ... and high = ..."
    unknown = sorted(set(table) - {"choices", "low", "high", "log", "step"})
    if unknown:
        return None, f"unknown key {unknown[0]!r}; use choices, or low, high, log, step"
    if "choices" in table:
        choices = table["choices"]
        if set(table) != {"choices"}:
            return None, "choices goes alone (no low/high/log/step)"
        if not isinstance(choices, list) or not choices:
            return None, "choices must be a non-empty list"
        if not all(isinstance(c, (str, int, float, bool)) for c in choices):
            return None, "choices must be strings, numbers or booleans"
        return Param(key, choices=tuple(choices)), None
    low: Any = table.get("low")
    high: Any = table.get("high")
    if not (_number(low) and _number(high)):
        return None, "give choices = [...], or numbers low and high"
    if low >= high:
        return None, f"low ({low}) must be below high ({high})"
    log, step = table.get("log", False), table.get("step")
    if not isinstance(log, bool):
        return None, "log must be true or false"
    if log and low <= 0:
        return None, "a log range needs low > 0"
    if step is not None and (not _number(step) or step <= 0 or log):
        return None, "step must be a positive number, and cannot go with log"
    integer = isinstance(low, int) and isinstance(high, int)
    if integer and step is not None and not isinstance(step, int):
        return None, "an integer range takes an integer step"
    return Param(key, low=low, high=high, log=log, step=step), None


def toml_value(value: Any) -> str:
    """``value`` as the VALUE of a ``KEY=VALUE`` override."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    # the characters themselves: TOML reads no \ud83d\ude00 surrogate escapes, and the
    # override would fall back to the escaped text as a raw string (an emoji choice trained
    # as its JSON escape)
    return json.dumps(value, ensure_ascii=False)
