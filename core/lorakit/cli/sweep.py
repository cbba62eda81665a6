"""``lorakit sweep RECIPE [KEY=VALUE ...] --space sweep.toml [--trials N]``: a hyper-parameter
search; prints the trials ranked by the recipe's main metric, then ``compare``'s table of the
sweep's folder."""

from __future__ import annotations

from lorakit.cli.common import add_recipe_args


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="search hyper-parameters (Optuna), pruning on eval loss")
    add_recipe_args(p)
    p.add_argument("--space", required=True, metavar="SWEEP.TOML", help="what to search")
    p.add_argument(
        "--trials",
        type=int,
        metavar="N",
        help="trials in the study, all processes together (default: [sweep].trials)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from lorakit.console import say
    from lorakit.evaluation.collect import collect_rows, markdown_table
    from lorakit.sweep import open_sweep
    from lorakit.sweep_space import read_space
    from lorakit.sweep_study import ranking, ranking_table, run_sweep

    sweep = open_sweep(args.recipe, args.overrides, read_space(args.space))
    study = run_sweep(sweep, say, args.trials)
    print(f"sweep {sweep.folder.name}: trials ranked by {sweep.metric} on {sweep.split}")
    print(ranking_table(sweep, ranking(sweep, study)))
    # the base model once: the sweep's own baseline (each trial's report repeats it)
    rows = [
        r
        for r in collect_rows(sweep.folder)
        if r["adapter"] is not None or r["run"] == sweep.folder.name
    ]
    if rows:
        print(f"\nlorakit compare {sweep.folder}:")
        print(markdown_table(rows))
    print(f"\nstudy: {sweep.folder / 'study.db'} (run the same command again to resume or extend)")
    return 0
