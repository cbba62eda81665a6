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

    from lorakit.catalog import default_catalog
    from lorakit.components import build_components
    from lorakit.console import say
    from lorakit.evaluation.evaluate import evaluate_run
    from lorakit.recipe import load_recipe

    catalog = default_catalog()
    recipe = load_recipe(args.recipe, args.overrides, catalog)
    components = build_components(recipe, catalog)
    report = evaluate_run(recipe, components, Path(recipe.run_dir), adapter=False, say=say)
    if report is not None:
        print(f"done: {report}")
    return 0
