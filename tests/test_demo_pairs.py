"""The demo's preference pairs (examples/demo_task/make_pairs.py): new requests only, the exact
answer chosen, a near miss of it rejected, every kind of near miss present, and every pair read
by ``preference_jsonl`` without a reject."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "demo_task"))

import make_pairs  # noqa: E402


def test_pairs_are_new_requests_with_the_exact_answer_chosen_over_a_near_miss(tmp_path):
    from lorakit.api import read_source
    from lorakit_plugins.sources.preference_jsonl import PreferenceJsonlSource

    path = make_pairs.main(["--n", "64", "--out", str(tmp_path)])
    assert make_pairs.main(["--n", "64", "--out", str(tmp_path)]).read_bytes() == path.read_bytes()
    sft = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in path.read_text().splitlines()]
    seen = {r["messages"][1]["content"] for r in sft}
    requests = [p["prompt"][1]["content"] for p in pairs]
    assert not seen & set(requests) and len(set(requests)) == len(pairs) == 64
    assert {p["meta"]["kind"] for p in pairs} == set(make_pairs.KINDS)
    for p in pairs:
        answer = json.loads(p["chosen"])
        assert list(answer) == ["item", "color", "size", "max_price"]
        assert p["chosen"] == json.dumps(answer)  # the SFT data's exact format
        assert p["rejected"] != p["chosen"]
        # not the answer: another value, or not JSON at all (fence, quotes, chatter)
        with contextlib.suppress(json.JSONDecodeError):
            assert json.loads(p["rejected"]) != answer
    examples, skipped = read_source(PreferenceJsonlSource, {"path": str(path)}, recipe_dir=tmp_path)
    assert len(examples) == 64 and not skipped
