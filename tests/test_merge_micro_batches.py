"""Micro-batches of one optimizer step merged into fewer packed rows on CPU
(``train.merge_micro_batches``): the same examples and loss, the same count of micro-batches for
the Trainer, exact resume, and a memory plan that counts the merged rows."""

from __future__ import annotations

import json

import attrs
import pytest
import torch
from helpers import (
    chat_records,
    logged_steps,
    resume_split_run,
    run_adapter,
    run_probe,
    tiny_recipe,
    write_jsonl,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from lorakit.packing import (
    IGNORE_INDEX,
    MERGE_TOKENS,
    MERGED,
    consecutive_batches,
    merge_budget,
    merge_micro_batches,
    merge_packed,
    pack,
)

# 1 example a micro-batch, 4 a step, rows of up to 128 tokens: about 4 examples of ~30 merge
FOUR_OF_ONE = (
    "train.per_device_train_batch_size=1",
    "train.gradient_accumulation_steps=4",
    "train.max_length=128",
)

example = st.lists(st.tuples(st.integers(0, 500), st.booleans()), min_size=1, max_size=20)
micro_batches = st.lists(st.lists(example, min_size=1, max_size=4), min_size=1, max_size=6)


def _rows(spec):
    return [
        {"input_ids": [t for t, _ in r], "labels": [t if s else IGNORE_INDEX for t, s in r]}
        for r in spec
    ]


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@settings(max_examples=80, deadline=None)
@given(micro_batches)
def test_merged_rows_are_the_rows_pack_builds_from_all_their_examples(spec):
    batches = [_rows(b) for b in spec]
    _same(merge_packed([pack(b) for b in batches]), pack([r for b in batches for r in b]))


@settings(max_examples=80, deadline=None)
@given(micro_batches, st.integers(1, 80))
def test_a_step_keeps_its_examples_in_order_and_its_micro_batch_count(spec, budget):
    batches = [pack(_rows(b)) for b in spec]
    out = merge_micro_batches(batches, budget)
    assert len(out) == len(batches), "the Trainer counts micro-batches to end a step"
    freed = [b for b in out if b.get(MERGED)]
    real = out[len(freed) :]
    assert all(not b.get(MERGED) for b in real), "the emptied places come first"
    assert all(b["input_ids"].numel() == 0 for b in freed)
    _same(merge_packed(real), merge_packed(batches))  # every example once, in order
    for b in real:  # within the budget, unless one micro-batch was longer on its own
        n = b["input_ids"].shape[1]
        assert n <= budget or any(n == x["input_ids"].shape[1] for x in batches)
    if budget >= sum(b["input_ids"].shape[1] for b in batches):
        assert len(real) == 1
    sizes = [b["input_ids"].shape[1] for b in batches]
    assert len(real) == len(consecutive_batches(sizes, budget)), "as few rows as fit"
    if len(real) < len(batches):  # and even: a smaller largest merged row would need more rows
        merged, left = [], iter(sizes)
        for b in real:
            n, parts = b["input_ids"].shape[1], 0
            while n > 0:
                n, parts = n - next(left), parts + 1
            if parts > 1:
                merged.append(b["input_ids"].shape[1])
        assert len(consecutive_batches(sizes, max(merged) - 1)) > len(real)


def test_merging_applies_on_cpu_to_one_process_sft_and_pairs_with_accumulation():
    from lorakit.sections import TrainSection

    t = TrainSection(per_device_train_batch_size=1, gradient_accumulation_steps=8, max_length=2048)
    assert merge_budget(t, "cpu", 1) == MERGE_TOKENS
    # never more tokens than the recipe's own micro-batch may hold
    assert merge_budget(attrs.evolve(t, max_length=300), "cpu", 1) == 300
    assert merge_budget(attrs.evolve(t, per_device_train_batch_size=2, max_length=300), "cpu", 1)
    for pairs in ("dpo", "orpo", "simpo"):  # a sum over pairs, like SFT's over tokens
        assert merge_budget(attrs.evolve(t, objective=pairs), "cpu", 1) == MERGE_TOKENS
        # a micro-batch of pairs may hold two sides of up to max_length
        short = attrs.evolve(t, objective=pairs, max_length=300)
        assert merge_budget(short, "cpu", 1) == 600
    for off in (
        merge_budget(t, "cuda", 1),
        merge_budget(t, "cpu", 2),
        merge_budget(attrs.evolve(t, gradient_accumulation_steps=1), "cpu", 1),
        merge_budget(attrs.evolve(t, merge_micro_batches=False), "cpu", 1),
        merge_budget(attrs.evolve(t, neftune_noise_alpha=5.0), "cpu", 1),
        merge_budget(attrs.evolve(t, objective="kto", per_device_train_batch_size=2), "cpu", 1),
    ):
        assert off == 0


def test_a_resumed_run_merges_as_it_started(tmp_path, tiny_model_dir, chat_file):
    from lorakit.recipe import load_recipe
    from lorakit.runner import Start, merge_tokens

    recipe = load_recipe(
        tiny_recipe(tmp_path, tiny_model_dir, chat_file),
        overrides=["train.gradient_accumulation_steps=4"],
    )
    assert merge_tokens(recipe, Start(), "cpu") == 4 * 64
    resumed = Start(checkpoint=tmp_path / "checkpoint-2", merge_tokens=0)
    assert merge_tokens(recipe, resumed, "cpu") == 0, "started before lorakit merged"
    assert merge_tokens(recipe, attrs.evolve(resumed, merge_tokens=200), "cpu") == 200


def _count_merges(monkeypatch):
    import lorakit.packing as packing

    seen = {"merged_rows": 0, "examples": 0}
    original = packing.merge_packed

    def counting(batches):
        seen["merged_rows"] += 1
        seen["examples"] += sum(len(b["row_index"]) for b in batches)
        return original(batches)

    monkeypatch.setattr(packing, "merge_packed", counting)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "bnb-4bit"])
def test_merged_micro_batches_train_what_separate_ones_do(
    tmp_path, tiny_model_dir, cli, monkeypatch, quant
):
    """1 example a micro-batch, 4 a step: merged into one packed row of up to 128 tokens
    (about 4 examples of ~30) or run one by one, the steps see the same tokens and the same
    losses, and the adapters agree to fp32 rounding (dropout off: its masks are drawn per
    micro-batch, so with it the two runs draw different masks); over a 4-bit base too."""
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data, quant=quant)
    common = (
        *FOUR_OF_ONE,
        "train.max_steps=5",
        "train.save_steps=100",
        "peft.dropout=0.0",
        'eval.metrics=["eval_loss"]',
    )
    seen = _count_merges(monkeypatch)
    code, out, err = cli("run", recipe, "output.name=merged", *common)
    assert code == 0, err
    assert "merged into packed rows of up to 128 tokens" in out + err
    assert seen["merged_rows"] >= 5 and seen["examples"] >= 15, seen  # it really merged
    batch = json.loads((tmp_path / "runs/merged/run.json").read_text())["batch"]
    assert batch["merged_micro_batch_tokens"] == 128
    seen.update(merged_rows=0, examples=0)
    code, _, err = cli(
        "run", recipe, "output.name=apart", "train.merge_micro_batches=false", *common
    )
    assert code == 0, err
    assert seen["merged_rows"] == 0
    merged, apart = logged_steps(tmp_path / "runs/merged"), logged_steps(tmp_path / "runs/apart")
    assert [r["num_input_tokens_seen"] for r in merged] == [
        r["num_input_tokens_seen"] for r in apart
    ]
    assert [r["loss"] for r in merged] == pytest.approx([r["loss"] for r in apart], rel=1e-5)
    a, b = run_adapter(tmp_path / "runs/merged"), run_adapter(tmp_path / "runs/apart")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


@pytest.mark.slow
def test_a_merged_run_resumes_to_the_uninterrupted_adapter(tmp_path, tiny_model_dir, cli):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data)
    common = [
        *FOUR_OF_ONE,
        "train.save_steps=2",
        'train.lr_scheduler_type="constant"',
        'eval.metrics=["eval_loss"]',
    ]
    assert cli("run", recipe, "output.name=full", "train.max_steps=4", *common)[0] == 0
    split = resume_split_run(cli, recipe, tmp_path / "runs", common)
    history = json.loads((tmp_path / "runs/split/run.json").read_text())["history"]
    assert history[-1]["event"] == "resume"
    assert history[-1]["batch"]["merged_micro_batch_tokens"] == 128, "the resume merged"
    full = run_adapter(tmp_path / "runs/full")
    assert all(torch.equal(full[k], split[k]) for k in full), "a resumed merged run differs"


def test_the_plan_counts_the_merged_rows(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data)
    tokens = {}
    for merge in ("true", "false"):
        res = run_probe(
            "plan", str(recipe), *FOUR_OF_ONE, f"train.merge_micro_batches={merge}", cwd=tmp_path
        )
        assert res.returncode == 0, res.stderr
        line = next(x for x in res.stdout.splitlines() if "micro-batch" in x)
        tokens[merge] = int(line.split("micro-batch ")[1].split(" tokens")[0])
        assert ("merged up to 128 tokens" in res.stdout) == (merge == "true")
    # 4 of the longest examples (~30 tokens each) against the longest one
    assert tokens["false"] < tokens["true"] <= 128, tokens
    res = run_probe("plan", str(recipe), *FOUR_OF_ONE, "--device-memory", "1MB", cwd=tmp_path)
    assert res.returncode == 1 and "train.merge_micro_batches = false" in res.stdout


def test_a_resume_that_does_not_fit_is_planned_and_advised_as_a_resume(
    tmp_path, tiny_model_dir, cli
):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data)
    args = ("run", recipe, *FOUR_OF_ONE, "output.name=resumed", "--device-memory", "1MB")
    code, _out, err = cli(*args)
    assert code == 2 and "try train.merge_micro_batches = false" in err
    # the folder of a run that started before lorakit merged micro-batches: its run.json
    # records no merge, so its resume does not merge, and a resume refuses any change to what
    # is trained (the plan's fixes but the eval batch are for a new run)
    folder = tmp_path / "runs" / "resumed"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"batch": {"world_size": 1}}))
    code, _out, err = cli(*args, "--resume-from-checkpoint", "auto")
    assert code == 2 and "memory plan predicts" in err
    assert "merge_micro_batches" not in err, "planned as merging, which the resume does not"
    assert "start a new run in another output.dir with a smaller train." in err
    assert "try " not in err and "Traceback" not in err


pair = st.tuples(
    st.lists(st.integers(0, 500), min_size=1, max_size=8),  # prompt
    st.lists(st.integers(0, 500), min_size=1, max_size=6),  # chosen answer
    st.lists(st.integers(0, 500), min_size=1, max_size=6),  # rejected answer
    st.floats(-50, 0),
)


def _pair_rows(spec):
    return [
        {
            "chosen_ids": p + c,
            "chosen_labels": [IGNORE_INDEX] * len(p) + c,
            "rejected_ids": p + r,
            "rejected_labels": [IGNORE_INDEX] * len(p) + r,
            "index": i,
            "reference": (ref, ref - 1.0),
        }
        for i, (p, c, r, ref) in enumerate(spec)
    ]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(pair, min_size=1, max_size=3), min_size=1, max_size=4), st.booleans())
def test_merged_pair_rows_are_the_rows_pack_pairs_builds_from_all_their_pairs(spec, share):
    from lorakit.preference import pack_pairs

    rows = _pair_rows([p for b in spec for p in b])
    batches, start = [], 0
    for b in spec:
        batches.append(pack_pairs(rows[start : start + len(b)], share_prompt=share))
        start += len(b)
    _same(merge_packed(batches), pack_pairs(rows, share_prompt=share))


@pytest.mark.slow
def test_merged_pair_micro_batches_train_what_separate_ones_do(
    tmp_path, tiny_model_dir, cli, monkeypatch
):
    """DPO, 1 pair a micro-batch and 4 a step, the reference once and in each step: merged
    (rows of up to 2 x 128 tokens: two pairs of ~115, their common system prompt shared) or
    apart, the same losses and rewards (dropout off)."""
    from helpers import preference_records, with_preference_source

    with_preference_source(monkeypatch)
    system = {"role": "system", "content": "Answer with one JSON object and nothing else."}
    pairs = [{**r, "prompt": [system, *r["prompt"]]} for r in preference_records(24)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data, source="preference_jsonl")
    seen = _count_merges(monkeypatch)
    for mode in ("once", "every_step"):
        common = (
            *FOUR_OF_ONE,
            'train.objective="dpo"',
            "train.beta=0.1",
            f'train.reference_logps="{mode}"',
            "train.max_steps=3",
            "train.save_steps=100",
            "peft.dropout=0.0",
            'eval.metrics=["eval_loss"]',
        )
        seen.update(merged_rows=0, examples=0)
        code, out, err = cli("run", recipe, f"output.name=merged-{mode}", *common)
        assert code == 0, err
        assert "merged into packed rows of up to 256 tokens" in out + err
        assert seen["merged_rows"] >= 3 and seen["examples"] >= 6, seen
        assert "fewer; train.share_prefix)" in out + err  # and shared their prefix
        code, _, err = cli(
            "run",
            recipe,
            f"output.name=apart-{mode}",
            "train.merge_micro_batches=false",
            *common,
        )
        assert code == 0, err
        merged = logged_steps(tmp_path / f"runs/merged-{mode}")
        apart = logged_steps(tmp_path / f"runs/apart-{mode}")
        # (not the reward accuracy: at the first step policy and reference are equal, and which
        # reward is larger comes down to float order)
        for key in ("loss", "rewards/margins", "rewards/chosen", "num_input_tokens_seen"):
            assert [r[key] for r in merged] == pytest.approx(
                [r[key] for r in apart], rel=1e-4, abs=3e-6
            ), (mode, key)
