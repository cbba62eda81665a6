"""A prefix every example of a packed row starts with, computed once per row on CPU
(``train.share_prefix``, ``lorakit.prefix_sharing``): the layout keeps every example and
target, the model computes each example's log-probabilities and gradients as whole, runs train
what they trained with every example whole, and a resumed run shares as it started."""

from __future__ import annotations

import itertools
import json

import attrs
import pytest
import torch
from helpers import (
    load_tiny_model,
    logged_steps,
    preference_records,
    resume_split_run,
    run_adapter,
    tiny_recipe,
    with_preference_source,
    write_jsonl,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from lorakit.packing import IGNORE_INDEX, pack
from lorakit.prefix_sharing import (
    DATA_TOKENS,
    PREFIX_KEY,
    common_prefix,
    data_tokens,
    share_row_prefix,
    shares_row_prefix,
)

SYSTEM = "You are an assistant that answers with one JSON object and nothing else."

token = st.integers(0, 40)
tail = st.lists(st.tuples(token, st.booleans()), min_size=0, max_size=12)


@st.composite
def rows_with_a_prefix(draw):
    """2-5 examples that start with a common prefix (sometimes supervised), then differ."""
    prefix = draw(st.lists(token, min_size=0, max_size=16))
    supervised_from = draw(st.integers(0, 20))
    rows = []
    for _ in range(draw(st.integers(2, 5))):
        ids = prefix + [t for t, _ in draw(tail)]
        if not ids:
            ids = [draw(token)]
        labels = [
            t if (i >= supervised_from and (i >= len(prefix) or draw(st.booleans()))) else -100
            for i, t in enumerate(ids)
        ]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _examples(batch):
    """Each example of a packed batch as (tokens, positions, shifted targets), whole again."""
    bounds = batch["cu_seq_lens_q"].tolist()
    ids, pos, tgt = (batch[k][0].tolist() for k in ("input_ids", "position_ids", "labels"))
    n = int(batch.get(PREFIX_KEY, 0))
    seqs = list(itertools.pairwise(bounds))
    if n:
        assert seqs[0] == (0, n)
        seqs = seqs[1:]
    return [
        (ids[:n] + ids[a:b], pos[:n] + pos[a:b], tgt[:n] + tgt[a:b])
        if n
        else (ids[a:b], pos[a:b], tgt[a:b])
        for a, b in seqs
    ]


@settings(max_examples=150, deadline=None)
@given(rows_with_a_prefix(), st.integers(1, 6))
def test_a_shared_prefix_keeps_every_example_and_target(rows, minimum):
    whole = pack(rows)
    shared = share_row_prefix(whole, minimum)
    n = common_prefix(whole)
    assert data_tokens(shared) == whole["input_ids"].numel(), "tokens seen count examples whole"
    if n < minimum:
        assert PREFIX_KEY not in shared and torch.equal(shared["input_ids"], whole["input_ids"])
        return
    assert int(shared[PREFIX_KEY]) == n and shared[DATA_TOKENS] == whole["input_ids"].numel()
    assert shared["input_ids"].shape[1] == whole["input_ids"].shape[1] - n * (len(rows) - 1)
    assert _examples(shared) == _examples(whole), "an example, target or position changed"
    # only unsupervised positions are shared (no loss term lost or counted twice), and each
    # example keeps a position of its own
    assert all(t == IGNORE_INDEX for t in shared["labels"][0, :n].tolist())
    assert all(len(r["input_ids"]) > n for r in rows)
    assert torch.equal(shared["row_index"], whole["row_index"])


def test_the_prefix_is_as_long_as_the_tokens_and_targets_allow():
    p = list(range(10))
    a = {"input_ids": [*p, 20, 21], "labels": [-100] * 11 + [21]}
    b = {"input_ids": [*p, 30], "labels": [-100] * 10 + [30]}
    assert common_prefix(pack([a, b])) == 9, "position 9 predicts b's supervised token 30"
    b["labels"] = [-100] * 11
    assert common_prefix(pack([a, b])) == 10
    assert common_prefix(pack([a, {"input_ids": p, "labels": p}])) == 0  # supervised from 1
    assert common_prefix(pack([a])) == 0  # one example: nothing to share


def test_sharing_applies_on_cpu_to_sft_and_pair_objectives_without_neftune():
    from lorakit.sections import TrainSection

    t = TrainSection()
    assert shares_row_prefix(t, "cpu")
    assert shares_row_prefix(attrs.evolve(t, objective="dpo", beta=0.1), "cpu")
    for off in (
        shares_row_prefix(t, "cuda"),
        shares_row_prefix(attrs.evolve(t, share_prefix=False), "cpu"),
        shares_row_prefix(attrs.evolve(t, neftune_noise_alpha=5.0), "cpu"),
        shares_row_prefix(attrs.evolve(t, objective="kto", beta=0.1), "cpu"),
    ):
        assert not off


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        load_tiny_model(tiny_model_dir),
        LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0),
    )
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained adapter, not a fresh one that adds zero
            torch.nn.init.normal_(p, std=0.1)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA too
    return model


def _rows_sharing(n_prefix: int, tails: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 200, (n_prefix,), generator=g).tolist()
    rows = []
    for k in tails:
        ids = prefix + torch.randint(0, 200, (k,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n_prefix + 2) + ids[n_prefix + 2 :]})
    return rows


def _nll_and_grads(model, batch):
    from lorakit.attention import packed_attention
    from lorakit.loss import supervised_token_nll

    model.zero_grad()
    with packed_attention(model, "cpu"):
        nll, _ = supervised_token_nll(model, batch)
    nll.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return nll.detach().float(), grads


@pytest.mark.parametrize("tails", [[20, 35, 9, 50], [5, 9, 3]])
def test_the_model_computes_each_example_as_whole(lora_model, tails):
    """fp32: the same per-token NLL and LoRA gradients with the prefix shared (float sums in
    another order: to 1e-5 of their scale); examples longer than the prefix attend with its
    queries in one causal call, shorter ones through a mask (and, where no example is longer,
    the prefix attends on its own)."""
    whole = pack(_rows_sharing(14, tails))
    shared = share_row_prefix(whole)
    assert int(shared[PREFIX_KEY]) == 14
    lora_model.train()
    a, ga = _nll_and_grads(lora_model, whole)
    b, gb = _nll_and_grads(lora_model, shared)
    assert torch.allclose(a, b, atol=1e-5)
    for name in ga:
        scale = ga[name].abs().max()
        assert (ga[name] - gb[name]).abs().max() <= 1e-5 * scale + 1e-7, name


@pytest.mark.parametrize("block_queries", [None, 8], ids=["one_block", "query_blocks"])
def test_bf16_attention_matmuls_compute_each_example_as_whole(
    lora_model, monkeypatch, block_queries
):
    """bf16, with every example through lorakit.math_attention (its minimum length lowered for
    the tiny model): the longer examples' whole causal calls and the shorter one's masked call
    after the prefix give the per-token NLL and gradients of the whole row, and both stay near
    the fp32 model's. bf16 keeps 8 bits (2^-9 relative per rounding) and each activation is
    rounded a few times: measured, the NLL the same to the last bit shared or whole and 2.2e-3
    from fp32, the gradients within 6.4e-3 of their largest entry (bounds: 1e-2 and 3e-2). With
    ``block_queries`` the examples attend in blocks of that many queries, the masked one too
    (the blocks follow its mask: the prefix, then causal)."""
    import copy

    from lorakit import math_attention

    calls = []
    real = math_attention.attention
    monkeypatch.setattr(math_attention, "MIN_KEYS", 8)
    if block_queries:
        monkeypatch.setattr(math_attention, "BLOCK_QUERIES", block_queries)
    monkeypatch.setattr(
        math_attention, "attention", lambda q, *a, **k: calls.append(q.shape[2]) or real(q, *a, **k)
    )
    model = copy.deepcopy(lora_model).to(torch.bfloat16).train()
    whole = pack(_rows_sharing(14, [20, 35, 9, 50]))
    shared = share_row_prefix(whole)
    a, ga = _nll_and_grads(model, whole)
    b, gb = _nll_and_grads(model, shared)
    assert 9 in calls, "the example shorter than the prefix attends after it, through a mask"
    if block_queries:
        assert max(calls) >= 2 * block_queries, calls
    lora_model.train()
    exact, _ = _nll_and_grads(lora_model, whole)
    assert (a - b).abs().max() < 1e-2 and (a - exact).abs().max() < 1e-2
    for name in ga:
        scale = ga[name].float().abs().max()
        assert (ga[name].float() - gb[name].float()).abs().max() <= 3e-2 * scale, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_rows_masks_are_built_once_for_all_layers_and_change_nothing(
    lora_model, monkeypatch, dtype
):
    """Every layer attends a row's examples with the same masks, so lorakit builds them in the
    first layer only (attention._RowMasks, keyed by the row's boundaries tensor, which
    transformers hands every layer as the same object). Built in every layer instead, the
    per-token NLL and the gradients are the same bits; and the count of masks built is that of
    the row's distinct example shapes, not that times the layers. In bf16 every example goes
    through math_attention (its minimum length lowered for the tiny model); in fp32 the flash
    kernel takes the masked ones (the examples after the shared prefix)."""
    import copy

    from lorakit import attention, math_attention

    class EveryLayer:
        def get(self, row, key, build):
            return build()

    built = []
    real = attention._mask
    monkeypatch.setattr(attention, "_mask", lambda q, *a: built.append(q.shape[2]) or real(q, *a))
    monkeypatch.setattr(math_attention, "MIN_KEYS", 8)
    model = copy.deepcopy(lora_model).to(dtype).train()
    layers = model.config.num_hidden_layers
    assert layers >= 2
    row = share_row_prefix(pack(_rows_sharing(14, [20, 35, 9, 50])))
    once, g_once = _nll_and_grads(model, row)
    shapes = len(set(built))
    assert 0 < len(built) == shapes <= 4, built
    built.clear()
    monkeypatch.setattr(attention, "_ROW_MASKS", EveryLayer())
    every, g_every = _nll_and_grads(model, row)
    assert len(built) == layers * shapes
    assert once.equal(every)
    assert all(g_once[name].equal(g_every[name]) for name in g_once)


def test_pairs_share_a_prefix_across_pairs_and_score_as_whole(lora_model):
    """Pairs packed with their prompt once, and the prompts' common prefix once for the row:
    each sequence's log-probability is what it is as two whole sequences."""
    from lorakit.attention import packed_attention
    from lorakit.preference import pack_pairs, sequence_logps

    rows = []
    for i, r in enumerate(_rows_sharing(12, [6, 9, 4], seed=1)):
        prompt = r["input_ids"]
        g = torch.Generator().manual_seed(10 + i)
        chosen, rejected = (torch.randint(0, 200, (k,), generator=g).tolist() for k in (5, 7))
        rows.append(
            {
                "chosen_ids": prompt + chosen,
                "chosen_labels": [-100] * len(prompt) + chosen,
                "rejected_ids": prompt + rejected,
                "rejected_labels": [-100] * len(prompt) + rejected,
                "index": i,
            }
        )
    lora_model.eval()
    with torch.no_grad(), packed_attention(lora_model, "cpu"):
        whole, _ = sequence_logps(lora_model, pack_pairs(rows, share_prompt=False))
        prompt_once = pack_pairs(rows, share_prompt=True)
        shared = share_row_prefix(prompt_once)
        assert int(shared[PREFIX_KEY]) == 12
        assert shared["input_ids"].shape[1] == prompt_once["input_ids"].shape[1] - 2 * 12
        logps, counts = sequence_logps(lora_model, shared)
    assert counts.tolist() == [5, 7] * 3
    assert torch.allclose(logps, whole, atol=1e-4), (logps, whole)


def _chat_with_system(n: int) -> list[dict]:
    from helpers import chat_records

    return [
        {**r, "messages": [{"role": "system", "content": SYSTEM}, *r["messages"]]}
        for r in chat_records(n)
    ]


def _count_shared(monkeypatch):
    import lorakit.prefix_sharing as sharing

    seen = {"rows": 0}
    original = sharing.share_row_prefix

    def counting(batch, minimum=sharing.MIN_SHARED):
        out = original(batch, minimum)
        seen["rows"] += PREFIX_KEY in out
        return out

    monkeypatch.setattr(sharing, "share_row_prefix", counting)
    import lorakit.training as training

    monkeypatch.setattr(training, "share_row_prefix", counting)
    return seen


@pytest.mark.slow
def test_a_run_sharing_prefixes_trains_what_whole_examples_do(
    tmp_path, tiny_model_dir, cli, monkeypatch, compute_dtype
):
    """The same steps, tokens seen and losses with the system prompt shared or not (dropout
    off: with it the shared positions draw one mask instead of one per example); in bf16 the
    losses agree to bf16's rounding of the activations (8 bits of mantissa: 1e-2)."""
    data = write_jsonl(tmp_path / "chat.jsonl", _chat_with_system(40))
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data, dtype=compute_dtype)
    common = (
        "train.max_steps=4",
        "train.save_steps=100",
        "peft.dropout=0.0",
        "train.max_length=128",
    )
    seen = _count_shared(monkeypatch)
    code, out, err = cli("run", recipe, "output.name=shared", *common)
    assert code == 0, err
    assert seen["rows"] >= 4, seen  # it really shared
    assert "computed once (train.share_prefix)" in out + err
    assert "fewer; train.share_prefix)" in out + err  # the positions it saved, said
    assert json.loads((tmp_path / "runs/shared/run.json").read_text())["batch"]["shared_prefix"]
    seen["rows"] = 0
    code, out, err = cli("run", recipe, "output.name=whole", "train.share_prefix=false", *common)
    assert code == 0, err
    assert seen["rows"] == 0 and "computed once" not in out + err and "fewer;" not in out + err
    shared, whole = logged_steps(tmp_path / "runs/shared"), logged_steps(tmp_path / "runs/whole")
    assert [r["num_input_tokens_seen"] for r in shared] == [
        r["num_input_tokens_seen"] for r in whole
    ]
    tolerance = 1e-5 if compute_dtype == "fp32" else 1e-2
    assert [r["loss"] for r in shared] == pytest.approx([r["loss"] for r in whole], rel=tolerance)


@pytest.mark.slow
def test_a_sharing_run_resumes_to_the_uninterrupted_adapter(tmp_path, tiny_model_dir, cli):
    data = write_jsonl(tmp_path / "chat.jsonl", _chat_with_system(40))
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data)
    common = ["train.save_steps=2", 'train.lr_scheduler_type="constant"', "train.max_length=128"]
    assert cli("run", recipe, "output.name=full", "train.max_steps=4", *common)[0] == 0
    split = resume_split_run(cli, recipe, tmp_path / "runs", common)
    history = json.loads((tmp_path / "runs/split/run.json").read_text())["history"]
    assert history[-1]["event"] == "resume" and history[-1]["batch"]["shared_prefix"]
    full = run_adapter(tmp_path / "runs/full")
    assert all(torch.equal(full[k], split[k]) for k in full), "a resumed sharing run differs"


def test_a_resumed_run_shares_as_it_started(tmp_path, tiny_model_dir, chat_file):
    from lorakit.recipe import load_recipe
    from lorakit.runner import Start, share_prefix

    recipe = load_recipe(tiny_recipe(tmp_path, tiny_model_dir, chat_file))
    assert share_prefix(recipe, Start(), "cpu")
    assert not share_prefix(recipe, Start(), "cuda")
    resumed = Start(checkpoint=tmp_path / "checkpoint-2")
    assert not share_prefix(recipe, resumed, "cpu"), "started before lorakit shared prefixes"
    assert share_prefix(recipe, attrs.evolve(resumed, share_prefix=True), "cpu")
    # resumed on a GPU, whose attention kernels know nothing of a shared prefix: whole rows
    assert not share_prefix(recipe, attrs.evolve(resumed, share_prefix=True), "cuda")


@pytest.mark.slow
def test_a_dpo_run_sharing_prompts_across_pairs_trains_what_whole_pairs_do(
    tmp_path, tiny_model_dir, cli, monkeypatch
):
    """DPO with the reference computed once and in each step: the pairs' common prompt prefix
    shared across the row gives the losses and rewards of pairs packed without it (the
    metrics are logged to 6 decimals: 3e-6 absolute)."""
    with_preference_source(monkeypatch)
    pairs = [
        {**r, "prompt": [{"role": "system", "content": SYSTEM}, *r["prompt"]]}
        for r in preference_records(24)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    recipe = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        data,
        source="preference_jsonl",
        extra='[eval]\nmetrics = ["eval_loss"]',
    )
    seen = _count_shared(monkeypatch)
    for mode in ("once", "every_step"):
        common = (
            'train.objective="dpo"',
            "train.beta=0.1",
            f'train.reference_logps="{mode}"',
            "train.max_steps=3",
            "train.max_length=128",
            "train.save_steps=100",
            "peft.dropout=0.0",
        )
        seen["rows"] = 0
        code, _, err = cli("run", recipe, f"output.name=shared-{mode}", *common)
        assert code == 0, err
        assert seen["rows"] >= 3, seen
        code, _, err = cli(
            "run", recipe, f"output.name=whole-{mode}", "train.share_prefix=false", *common
        )
        assert code == 0, err
        shared = logged_steps(tmp_path / f"runs/shared-{mode}")
        whole = logged_steps(tmp_path / f"runs/whole-{mode}")
        for key in ("loss", "rewards/margins", "rewards/chosen"):
            assert [r[key] for r in shared] == pytest.approx(
                [r[key] for r in whole], rel=1e-4, abs=3e-6
            ), (mode, key)


def test_a_sliding_window_is_checked_against_each_example_whole():
    """An example of 10 shared + 20 own positions is 30 long for a model's sliding window,
    though its own part is 20."""
    import types

    from lorakit.attention import varlen_sdpa
    from lorakit.errors import RunError

    q = torch.randn(1, 2, 10 + 20 + 5, 8)
    cu = torch.tensor([0, 10, 30, 35], dtype=torch.int32)
    module = types.SimpleNamespace(training=False)
    args = {"cu_seq_lens_q": cu, "row_prefix_len": torch.tensor(10, dtype=torch.int32)}
    out, _ = varlen_sdpa(module, q, q, q, None, sliding_window=30, **args)
    assert out.shape == (1, 35, 2, 8)
    with pytest.raises(RunError, match="sliding attention window of 29"):
        varlen_sdpa(module, q, q, q, None, sliding_window=29, **args)
