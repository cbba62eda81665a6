"""``lorakit baseline RECIPE [KEY=VALUE ...]``: score the base model alone on the eval splits.

Writes ``<run dir>/baseline/`` (eval_report.json, predictions.jsonl, report.md). A later
``lorakit run`` of the same recipe reuses it when the model, data and ``[eval]`` still match.
"""

from __future__ import annotations

from lorakit.cli.common import add_recipe_args


def add_parser(sub) -> None:
    p = sub.add_parser("baseline", help="score the base model (no adapter) on the eval splits")
    add_recipe_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from lorakit.console import say
    from lorakit.evaluation.evaluate import evaluate_run
    from lorakit.session import open_session

    session = open_session(args.recipe, args.overrides)
    recipe = session.recipe
    report = evaluate_run(recipe, session.components, Path(recipe.run_dir), adapter=False, say=say)
    if report is not None:
        print(f"done: {report}")
    return 0
