"""``lorakit doctor [--write-golden] [--json] [-v]``: a 3-step micro-run on the embedded model
against the golden record of this lorakit version (``lorakit.doctor``). Exits 0 when the stack
computes what the record says, 1 when it does not (naming the packages whose versions differ)."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="check that the installed training stack still trains what this lorakit version "
        "recorded (3 steps on the embedded model)",
    )
    p.add_argument(
        "--write-golden",
        action="store_true",
        help="record this stack's result as the golden record of this lorakit version (source "
        "checkout; commit the file)",
    )
    p.add_argument("--json", action="store_true", help="print the micro-run's record as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="show the micro-run's log")
    p.set_defaults(func=run)


def run(args) -> int:
    from lorakit.console import say
    from lorakit.doctor import compare, golden_for, micro_run, read_golden, write_golden

    golden = None if args.write_golden else golden_for()  # is there one, before the micro-run?
    say("doctor: training the embedded model for 3 steps (fp32, one thread)")
    record = micro_run(log=_to_stderr if args.verbose else None)
    if args.json:
        print(json.dumps(record, indent=1, ensure_ascii=False))
    if golden is None:
        say(f"golden record written: {write_golden(record)}")
        return 0
    verdict = compare(record, read_golden(golden), golden)
    for step in record["steps"]:
        print(f"step {step['step']}: loss {step['loss']:.6f}, grad norm {step['grad_norm']:.6f}")
    print(f"micro-run: {record['seconds']:.1f} s (model load included)")
    for note in verdict.notes:
        print(f"note: {note}")
    if verdict.ok:
        print(f"ok: the training stack computes what {verdict.golden.name} recorded")
        for name, (then, now) in verdict.changed_versions.items():
            print(f"  (with {name} {now}; the record has {then})")
        return 0
    print(f"DRIFT: the training stack does not match {verdict.golden.name}:")
    for problem in verdict.problems:
        print(f"  {problem}")
    if verdict.changed_versions:
        print("packages whose versions differ from the record's:")
        for name, (then, now) in verdict.changed_versions.items():
            print(f"  {name}: {then} -> {now}")
    else:
        print("no package version differs from the record's: the machine or lorakit changed")
    return 1


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)
