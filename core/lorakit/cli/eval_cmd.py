"""``lorakit eval RECIPE|RUN_DIR [KEY=VALUE ...] [--no-baseline]``: score a trained adapter.

Loads the base model as in training plus the run's adapter, scores the eval splits (and the
base model too unless ``[eval].baseline = false`` or ``--no-baseline``), and rewrites the run's
eval_report.json, predictions.jsonl, report.md and loss.png.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="score a trained adapter (and the base model) on the eval splits"
    )
    p.add_argument("target", help="a recipe .toml (its run folder) or a run folder")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override eval keys, e.g. eval.max_examples=20 eval.splits='[\"test\"]'",
    )
    p.add_argument("--no-baseline", action="store_true", help="score only base + adapter")
    p.set_defaults(func=run)


def run(args) -> int:
    from lorakit.console import say
    from lorakit.errors import RunError
    from lorakit.evaluation.evaluate import evaluate_run
    from lorakit.session import open_session

    session = open_session(args.target, args.overrides, runs=True)
    recipe, run_dir = session.recipe, session.run_dir
    if run_dir is None:
        raise RunError(
            f"{recipe.run_dir} holds no run of {args.target}",
            fix=f"train it first: lorakit run {args.target}",
        )
    baseline = False if args.no_baseline else None
    report = evaluate_run(
        recipe, session.components, run_dir, adapter=True, baseline=baseline, say=say
    )
    if report is not None:
        print(f"done: {report}")
    return 0
