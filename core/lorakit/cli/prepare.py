"""``lorakit prepare RECIPE``: read, validate and split the data; write the normalized splits.

Writes ``<run folder>/data/splits/{train,val,test}.jsonl`` (the same files ``lorakit run``
writes) and nothing else: the raw data is never modified, and the run folder is not marked as a
run (no ``run.json``), so a later ``lorakit run`` can still claim it.

A folder that already holds a run (``run.json``) is refused: its splits are the data that run
was trained on, written once by the run itself, and ``eval`` scores them.
"""

from __future__ import annotations

from lorakit.cli.common import add_recipe_args
from lorakit.data.pipeline import DataReport, load_splits, write_splits
from lorakit.errors import RunError
from lorakit.rundir import RunDir
from lorakit.safe_files import make_folder, refuse_links
from lorakit.session import open_session


def add_parser(sub) -> None:
    p = sub.add_parser("prepare", help="validate and split the data; write normalized splits")
    add_recipe_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    session = open_session(args.recipe, args.overrides)
    recipe = session.recipe
    run = RunDir(recipe.run_dir)
    run.refuse_a_link()
    if run.exists():
        raise RunError(
            f"{run.path} holds a run: its data/splits/ are what it was trained on and are "
            "never replaced",
            fix=f"prepare the data for a new run under another name, e.g. "
            f"output.name={recipe.name}-2",
        )
    run.refuse_foreign()  # someone's own folder: its files are not replaced
    report = DataReport()
    splits = load_splits(session.components.sources, recipe.data, recipe.recipe_dir, report)
    for line in report.lines():
        print(line)
    folder = run.splits
    make_folder(folder, run_folder=run.path)
    refuse_links(run.path)  # splits are never written through a link planted in the folder
    write_splits(folder, splits)
    for name in ("train", "val", "test"):
        print(f"{name}: {len(splits.get(name))} examples -> {folder / (name + '.jsonl')}")
    print(f"fingerprint {splits.fingerprint}")
    return 0
