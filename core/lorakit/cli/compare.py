"""``lorakit compare [RUNS_DIR] [--json]``: one table of every eval report under a folder.

Rows are (run, model, adapter, split, examples) with each metric as a column. ``run`` is the
folder the report came from (its path under RUNS_DIR when two folders share a name; the name
stored in the report follows in brackets when it differs, as in a copied run), ``examples`` the
number of examples scored. A base-model row appears once even when both a baseline report and a
run report hold it. ``--json`` prints a list of ``{run, run_name (stored in the report),
examples, model, adapter (null for the base model), split, metrics}``; a metric that is not a
number (NaN: nothing scored) is null.
"""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="table of every eval report under a runs folder")
    p.add_argument("runs_dir", nargs="?", default="runs", help="folder to search (default: runs)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of markdown")
    p.set_defaults(func=run)


def run(args) -> int:
    from lorakit.errors import RunError
    from lorakit.evaluation.collect import collect_rows, markdown_table
    from lorakit.rundir import json_text

    root = Path(args.runs_dir)
    if not root.is_dir():
        raise RunError(f"{root} is not a folder", fix="pass the folder that holds your run folders")
    rows = collect_rows(root)
    if args.json:
        keep = ("run", "run_name", "examples", "model", "adapter", "split", "metrics")
        print(json_text([{k: r[k] for k in keep} for r in rows], indent=2))
        return 0
    if not rows:
        raise RunError(
            f"no eval_report.json under {root}",
            fix="evaluate first: lorakit baseline RECIPE, lorakit eval RUN_DIR or lorakit run RECIPE",
        )
    print(markdown_table(rows))
    return 0
