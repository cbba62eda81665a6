"""``lorakit check RECIPE``: validate the recipe and read the data; no model, no torch."""

from __future__ import annotations

from lorakit.cli.common import add_recipe_args
from lorakit.data.pipeline import DataReport, load_splits
from lorakit.plugins import default_catalog
from lorakit.recipe import load_recipe


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="validate a recipe and its data without loading a model")
    add_recipe_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    catalog = default_catalog()
    recipe = load_recipe(args.recipe, args.overrides, catalog)
    print(f"recipe {args.recipe}: ok (run folder {recipe.run_dir})")
    report = DataReport()
    splits = load_splits(recipe, catalog, report)
    for line in report.lines():
        print(line)
    print(
        f"splits: train {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)}"
        f" (fingerprint {splits.fingerprint})"
    )
    return 0
