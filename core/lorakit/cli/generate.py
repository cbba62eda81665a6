"""``lorakit generate RUN_DIR|MODEL_DIR --prompt TEXT [--file F] [--compare]``.

RUN_DIR is a run folder (base + adapter, as trained); MODEL_DIR is a merged export, or an export
folder holding ``merged/``. Prompts, targets and decoding are :mod:`lorakit.generation`'s.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from lorakit.console import say
from lorakit.errors import DataError


def _temperature(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a temperature: use 0 (greedy) or a finite number above 0 (sample)"
        )
    return value


def _top_p(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a top-p: use a number in (0, 1]")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate replies from a run (base + adapter) or a merged export"
    )
    p.add_argument(
        "target",
        metavar="RUN_DIR|MODEL_DIR",
        help="a run folder, an export folder or a merged model folder",
    )
    p.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    p.add_argument(
        "--file",
        type=Path,
        help='prompts: one per line, or .jsonl with {"messages": [...]} (a final assistant turn is dropped) or {"prompt": ...}',
    )
    p.add_argument(
        "--compare", action="store_true", help="also generate with the base model, side by side"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="stop after this many tokens (default 128)"
    )
    p.add_argument(
        "--temperature", type=_temperature, default=0.0, help="0 (default): greedy; above 0: sample"
    )
    p.add_argument(
        "--top-p", type=_top_p, default=1.0, help="nucleus sampling threshold when sampling"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.add_argument(
        "--system",
        metavar="TEXT",
        help="system prompt for conversations without one (default: the one the run was "
        'trained with, when every training conversation had the same; "": none is given, '
        "though a chat template with a default system prompt still adds its own)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- run


def run(args) -> int:
    import transformers

    from lorakit.generation import generate_replies, open_generation_target, read_prompts

    transformers.logging.set_verbosity_error()
    if (
        args.max_new_tokens < 1
        or args.temperature < 0
        or not 0 < args.top_p <= 1
        or args.batch_size < 1
    ):
        raise DataError(
            "invalid decoding settings",
            fix="use --max-new-tokens >= 1, --temperature >= 0, 0 < --top-p <= 1, --batch-size >= 1",
        )
    conversations = read_prompts(args.prompt, args.file)
    target = open_generation_target(Path(args.target))
    if args.system is None and target.system is not None:
        say(f"system prompt as trained (--system to change): {target.system!r}")
    tuned, base = generate_replies(
        target,
        conversations,
        compare=args.compare,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        system=args.system,
    )
    for i, conv in enumerate(conversations):
        prompt = conv.messages[-1].content
        if args.json:
            rec: dict[str, Any] = {
                "prompt": prompt,
                "output": tuned[i].text,
                "stopped": tuned[i].stopped,
            }
            if base is not None:
                rec.update(base_output=base[i].text, base_stopped=base[i].stopped)
            print(json.dumps(rec, ensure_ascii=False))
            continue
        print(f"[{i + 1}] {prompt}")
        rows = [("tuned", tuned[i])] + ([("base", base[i])] if base is not None else [])
        for name, gen in rows:
            note = "" if gen.stopped else f"  [no end-of-turn within {args.max_new_tokens} tokens]"
            body = gen.text.replace("\n", "\n" + " " * 9)
            print(f"  {name:<6} {body}{note}")
        print()
    return 0
