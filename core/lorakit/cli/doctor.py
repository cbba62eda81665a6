"""``lorakit doctor [--write-golden] [--json] [-v]``: a 3-step micro-run on the embedded model
against the golden record of this lorakit version (``lorakit.doctor``). Exits 0 when the stack
computes what the record says, 1 when it does not (naming the packages whose versions differ).
With ``--json`` stdout holds exactly one JSON document: the record, with ``verdict`` (or, with
``--write-golden``, ``golden_written``) in it; the lines for people go to stderr."""

from __future__ import annotations

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
    p.add_argument(
        "--json",
        action="store_true",
        help="print the micro-run's record and verdict as one JSON document on stdout (the "
        "lines for people go to stderr)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show the micro-run's log")
    p.set_defaults(func=run)


def run(args) -> int:
    from lorakit.console import say
    from lorakit.doctor import compare, golden_for, micro_run, read_golden, write_golden
    from lorakit.rundir import json_text

    # --json: stdout holds one JSON document (the record, with the verdict in it); the lines
    # for people go to stderr
    show = _to_stderr if args.json else print
    golden = None if args.write_golden else golden_for()  # is there one, before the micro-run?
    say("doctor: training the embedded model for 3 steps (fp32, one thread)")
    record = micro_run(log=_to_stderr if args.verbose else None)
    if golden is None:
        written = write_golden(record)
        say(f"golden record written: {written}")
        if args.json:
            print(
                json_text({**record, "golden_written": str(written)}, indent=1, ensure_ascii=False)
            )
        return 0
    verdict = compare(record, read_golden(golden), golden)
    if args.json:
        print(
            json_text({**record, "verdict": _verdict_json(verdict)}, indent=1, ensure_ascii=False)
        )
    for step in record["steps"]:
        show(f"step {step['step']}: loss {step['loss']:.6f}, grad norm {step['grad_norm']:.6f}")
    show(f"micro-run: {record['seconds']:.1f} s (model load included)")
    for note in verdict.notes:
        show(f"note: {note}")
    if verdict.ok:
        show(f"ok: the training stack computes what {verdict.golden.name} recorded")
        for name, (then, now) in verdict.changed_versions.items():
            show(f"  (with {name} {now}; the record has {then})")
        return 0
    show(f"DRIFT: the training stack does not match {verdict.golden.name}:")
    for problem in verdict.problems:
        show(f"  {problem}")
    if verdict.changed_versions:
        show("packages whose versions differ from the record's:")
        for name, (then, now) in verdict.changed_versions.items():
            show(f"  {name}: {then} -> {now}")
    else:
        show("no package version differs from the record's: the machine or lorakit changed")
    return 1


def _verdict_json(verdict) -> dict:
    """``--json``'s ``verdict``: ok, the golden record's file, problems, notes, and the packages
    whose versions differ (name -> recorded, installed)."""
    return {
        "ok": verdict.ok,
        "golden": verdict.golden.name,
        "problems": verdict.problems,
        "notes": verdict.notes,
        "changed_versions": {
            name: {"recorded": then, "installed": now}
            for name, (then, now) in verdict.changed_versions.items()
        },
    }


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)
