"""``lorakit eval RECIPE|RUN_DIR [KEY=VALUE ...] [--no-baseline] [--lm-eval TASKS]``: score a
trained adapter.

Loads the base model as in training plus the run's adapter, scores the eval splits (and the
base model too unless ``[eval].baseline = false`` or ``--no-baseline``), and rewrites the run's
eval_report.json, predictions.jsonl, report.md and loss.png. ``--lm-eval`` adds
lm-evaluation-harness tasks (``[eval].lm_eval_tasks``), ``--lm-eval-include`` a folder of
local task YAMLs (``[eval].lm_eval_include``).
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
    p.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="also run these lm-evaluation-harness tasks, comma-separated (e.g. arc_easy,piqa); "
        "needs pip install 'lorakit[lmeval]'",
    )
    p.add_argument(
        "--lm-eval-include",
        metavar="DIR",
        help="a folder of local lm-eval task YAMLs (tasks named in --lm-eval, offline)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from lorakit.console import say
    from lorakit.errors import RunError
    from lorakit.evaluation.evaluate import evaluate_run
    from lorakit.session import open_session

    session = open_session(args.target, [*args.overrides, *lm_eval_overrides(args)], runs=True)
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
    if report is None:  # every split asked for is empty: nothing was scored or written
        splits = list(recipe.eval.splits)
        raise RunError(
            f"nothing was evaluated: the {' and '.join(splits)} split"
            f"{'s' if len(splits) > 1 else ''} of {run_dir} "
            f"{'hold' if len(splits) > 1 else 'holds'} no examples",
            fix='name a split that has examples (eval.splits=["val"]); an eval report already '
            "in the run folder is from an earlier evaluation and was left as it was",
        )
    print(f"done: {report}")
    return 0


def lm_eval_overrides(args) -> list[str]:
    """``--lm-eval`` and ``--lm-eval-include`` as recipe overrides (validated with the rest)."""
    import json
    from pathlib import Path

    out = []
    if args.lm_eval is not None:
        tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
        out.append(f"eval.lm_eval_tasks={json.dumps(tasks)}")
    if args.lm_eval_include is not None:  # relative to here, not to the recipe
        out.append(f"eval.lm_eval_include={json.dumps(str(Path(args.lm_eval_include).resolve()))}")
    return out
