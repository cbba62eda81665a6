"""``lorakit check RECIPE``: validate the recipe, read the data, lint it; no model, no torch.

``--launch-config FILE`` also checks an accelerate launch config (FSDP, DeepSpeed) against the
recipe, and ``lorakit check FILE.yaml`` checks one alone (:mod:`lorakit.launch_config`).

Token statistics need the model's tokenizer: it is read from a local folder with the
``tokenizers`` library (:mod:`lorakit.data.lite_tokenizer`), never through transformers.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from lorakit.cli.common import add_recipe_args
from lorakit.contracts import SPLITS, HasSystemPrompt
from lorakit.data.pipeline import (
    DataReport,
    load_splits,
    require_training_examples,
)
from lorakit.errors import DataError, LorakitError, printable
from lorakit.fidelity import TRAIN_SERVE_FIX, train_serve_problems, training_system_prompt
from lorakit.launch_config import check_launch_config, is_launch_config
from lorakit.secrets import credentials_warning, masked_keys
from lorakit.session import open_session


def _examples_to_show(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of examples: use 0 or more (0: show none)"
        )
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="validate a recipe and its data without loading a model")
    add_recipe_args(p, "path to a TOML recipe, or an accelerate config (.yaml/.json) alone")
    p.add_argument(
        "--launch-config",
        metavar="FILE",
        help="also check this accelerate launch config (FSDP/DeepSpeed YAML) against the recipe",
    )
    p.add_argument(
        "--show",
        type=_examples_to_show,
        default=0,
        metavar="N",
        help="print N formatted training examples with the supervised text marked",
    )
    p.add_argument(
        "--tokenizer",
        metavar="FOLDER",
        help="folder with tokenizer.json for token statistics (default: the recipe's model)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from lorakit.data.lint import LintStats, lint, show
    from lorakit.data.lite_tokenizer import LiteTokenizer, find_tokenizer_folder

    if is_launch_config(args.recipe) and not args.launch_config:
        if args.overrides:
            raise LorakitError(
                "KEY=VALUE overrides are recipe keys, but no recipe was given",
                where=str(args.recipe),
                fix="lorakit check RECIPE KEY=VALUE --launch-config " + args.recipe,
            )
        _print_launch(check_launch_config(args.recipe))
        return 0
    session = open_session(args.recipe, args.overrides)
    recipe, components = session.recipe, session.components
    print(f"recipe {args.recipe}: ok (run folder {recipe.run_dir})")
    secret = masked_keys(recipe.settings())
    if secret:  # accepted, masked in everything written; say where credentials belong
        print(f"note: {credentials_warning(secret)}")
    if args.launch_config:
        _print_launch(check_launch_config(args.launch_config, recipe, components))
    report = DataReport()
    splits = load_splits(components.sources, recipe.data, recipe.recipe_dir, report)
    for line in report.lines():
        print(printable(line))
    print(
        f"splits: train {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)}"
        f" (fingerprint {splits.fingerprint})"
    )
    require_training_examples(splits, recipe.data)
    folder: Path | None
    if args.tokenizer:
        folder, note = Path(args.tokenizer), ""
    else:
        folder, note = find_tokenizer_folder(components.model_source, recipe.model.name)
    if folder is None:
        print(f"token statistics skipped: {note} (or pass --tokenizer FOLDER)")
        return 0
    tokenizer = LiteTokenizer(folder)
    formatter = components.formatter
    t, overlength = recipe.train, recipe.data.overlength
    stats = LintStats()  # each split apart (streamed), so its drops are told apart
    for name in SPLITS:
        lint(splits.get(name), formatter, tokenizer, t.max_length, overlength, name, stats)
    print(f"format {recipe.format.name}, tokenizer {folder}:")
    for line in stats.lines(recipe.train.max_length, recipe.data.overlength):
        print(f"  {line}")
    mismatches = train_serve_problems(formatter, tokenizer, splits.train)
    if mismatches:
        print(f"  train/serve: {len(mismatches)} mismatch(es) between training and inference:")
        for problem in mismatches[:5]:
            print(printable(f"    {problem}"))
        print(f"    fix: {TRAIN_SERVE_FIX}")
    else:
        print("  train/serve: inference prompts are token prefixes of the training text")
    default = formatter.system_prompt if isinstance(formatter, HasSystemPrompt) else None
    system, system_note = training_system_prompt(itertools.chain(splits.train, splits.val), default)
    if system is not None:
        print(printable(f"  system prompt (generate and export use it by default): {system!r}"))
    elif system_note:
        print(f"  note: {system_note}")
    if recipe.train.objective == "kto":
        _print_answers(splits, formatter, tokenizer, recipe)
    elif recipe.train.objective != "sft":
        _print_pairs(splits, formatter, tokenizer, recipe)
    if args.show:
        color = sys.stdout.isatty()
        legend = "green" if color else "[[...]]"
        print(
            f"\n{min(args.show, len(splits.train))} training examples; supervised text in {legend}:"
        )
        for block in show(splits.train[: args.show], formatter, tokenizer, color):
            print(block)
    if recipe.data.overlength == "error" and stats.over_length:
        raise DataError(
            f"{sum(stats.over_length.values())} examples are longer than train.max_length="
            f"{recipe.train.max_length}: `lorakit run` would stop at the first",
            where="[data].overlength",
            fix="raise train.max_length, shorten those examples, or set [data] overlength = "
            '"drop" or "truncate"',
        )
    kto = recipe.train.objective == "kto"  # its answers were counted above
    if not kto and len(splits.train) and not stats.kept["train"]:
        raise DataError(
            "no training example is left after formatting: `lorakit run` would stop",
            where="[data]",
            fix="every training example is dropped (reasons above): raise train.max_length, "
            "shorten the examples, or add examples that fit",
        )
    return 0


def _print_pairs(splits, formatter, tokenizer, recipe) -> None:
    """Pairs per split, as ``run`` keeps them, with their lengths and what was dropped."""
    from lorakit.data.pairs import pair_lines, tokenize_pairs

    t = recipe.train
    print(f"preference pairs (objective {t.objective}):")
    for name in ("train", "val", "test"):
        report = DataReport()
        rows = tokenize_pairs(
            splits.get(name), formatter, tokenizer, t.max_length, recipe.data.overlength, report
        )
        for line in pair_lines(rows, name):
            print(f"  {line}")
        for reason, n in sorted(report.dropped.items()):
            print(f"  {name}: dropped {n} pairs: {reason}")


def _print_answers(splits, formatter, tokenizer, recipe) -> None:
    """KTO's labelled answers per split, as ``run`` keeps them (desirable and undesirable,
    lengths, drops), and whether the weights suit the training split's balance."""
    from lorakit.data.unpaired import answer_lines, tokenize_answers, weight_note

    t = recipe.train
    print("labelled answers (objective kto):")
    for name in ("train", "val", "test"):
        report = DataReport()
        rows = tokenize_answers(
            splits.get(name), formatter, tokenizer, t.max_length, recipe.data.overlength, report
        )
        for line in answer_lines(rows, name):
            print(f"  {line}")
        for reason, n in sorted(report.dropped.items()):
            print(f"  {name}: dropped {n} answers: {reason}")
        if name == "train":
            good = sum(r.desirable for r in rows)
            note = weight_note(good, len(rows) - good, t.desirable_weight, t.undesirable_weight)
            if note:
                print(f"  note: {note}")
            if not rows:
                raise DataError(
                    "no training answer is left after formatting: `lorakit run` would stop",
                    where="[data]",
                    fix="see the drops above: raise train.max_length, or add answers that fit",
                )


def _print_launch(result: tuple[str, list[str]]) -> None:
    summary, notes = result
    print(printable(summary))
    for note in notes:
        print(printable(f"  note: {note}"))
