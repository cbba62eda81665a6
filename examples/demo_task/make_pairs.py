"""Generate the demo task's preference pairs: the correct JSON filter chosen, a near miss rejected.

The preference variant of the demo (``make demo-dpo``, ``recipes/smollm2_dpo.toml``). Each pair
is a new shopping request, generated like ``make_data.py``'s but never one of its requests (the
SFT run trained on those), so the held-out pairs are new to both runs. ``chosen`` is the exact
answer of the task (``json.dumps`` of the four keys); ``rejected`` is the same answer with one
defect, the kind of mistake a small model makes on this task:

- ``size_word``: the size as the request words it (``"large"``), not the schema's letter;
- ``price_string``: ``max_price`` as a string (``"45"``), not a number;
- ``plural_item``: the item as the request's plural (``"hoodies"``);
- ``dropped_key``: a ``null`` key left out (the schema has all four, always);
- ``wrong_value``: a value copied wrong (the price off by 5, or the next color);
- ``code_fence``: the JSON wrapped in a Markdown code fence;
- ``single_quotes``: a Python dict (single quotes, ``None``): not JSON;
- ``chatter``: the JSON followed by a friendly sentence.

The kinds take turns, so every split holds each kind. Usage:
``python examples/demo_task/make_pairs.py [--n 180] [--seed 23] [--out DIR]`` writes
``DIR/pairs.jsonl`` (default ``examples/demo_task/data/``); it writes the SFT data first when
``requests.jsonl`` is not there yet, to know which requests to avoid.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_data import COLORS, ITEMS, SIZES, SYSTEM, make_example

KINDS = (
    "size_word",
    "price_string",
    "plural_item",
    "dropped_key",
    "wrong_value",
    "code_fence",
    "single_quotes",
    "chatter",
)


def near_miss(answer: dict, kind: str, rng: random.Random) -> str:
    """``answer`` (the correct filter) with one defect of ``kind``, as the model would write it;
    a kind that does not apply to this answer (no size to misspell) falls back to another."""
    bad = dict(answer)
    if kind == "size_word" and answer["size"]:
        bad["size"] = SIZES[answer["size"]][0]
    elif kind == "price_string" and answer["max_price"] is not None:
        bad["max_price"] = str(answer["max_price"])
    elif kind == "plural_item":
        bad["item"] = ITEMS[answer["item"]]
    elif kind == "dropped_key" and None in answer.values():
        bad.pop(rng.choice([k for k, v in answer.items() if v is None]))
    elif kind == "code_fence":
        return "```json\n" + json.dumps(answer) + "\n```"
    elif kind == "single_quotes":
        return repr(answer)
    elif kind == "chatter":
        return json.dumps(answer) + " Let me know if you need anything else!"
    elif answer["max_price"] is not None:  # wrong_value, and the fallback of the others
        bad["max_price"] = answer["max_price"] + 5
    elif answer["color"]:
        bad["color"] = COLORS[(COLORS.index(answer["color"]) + 1) % len(COLORS)]
    else:
        bad["item"] = ITEMS[answer["item"]]
    return json.dumps(bad)


def make_pairs(n: int, seed: int, avoid: set[str]) -> list[dict]:
    rng = random.Random(seed)
    pairs: list[dict] = []
    seen = set(avoid)
    while len(pairs) < n:
        ex = make_example(rng, len(pairs))
        request = ex["messages"][1]["content"]
        if request in seen:  # an SFT request, or one already paired
            continue
        seen.add(request)
        answer = json.loads(ex["messages"][2]["content"])
        kind = KINDS[len(pairs) % len(KINDS)]
        pairs.append(
            {
                "id": f"pair-{len(pairs):04d}",
                "prompt": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": request},
                ],
                "chosen": json.dumps(answer),
                "rejected": near_miss(answer, kind, rng),
                "meta": {"kind": kind},
            }
        )
    return pairs


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=180, help="number of pairs")
    parser.add_argument("--seed", type=int, default=23, help="random seed (same seed, same file)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "data", help="output folder"
    )
    args = parser.parse_args(argv)
    requests = args.out / "requests.jsonl"
    if not requests.exists():
        import make_data

        make_data.main(["--out", str(args.out)])
    avoid = {
        json.loads(line)["messages"][1]["content"]
        for line in requests.read_text(encoding="utf-8").splitlines()
    }
    pairs = make_pairs(args.n, args.seed, avoid)
    path = args.out / "pairs.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair) + "\n")
    print(f"wrote {len(pairs)} preference pairs to {path} (none of {requests.name}'s requests)")
    return path


if __name__ == "__main__":
    main()
