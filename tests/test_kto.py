"""KTO without training: the loss against TRL's ``KTOTrainer`` code on the same
log-probabilities, the mismatched rows of the KL estimate, the reference weights, the recipe
keys, the labelled-answer contract and ``preference_jsonl``'s unpaired records (issue 23).

TRL computes the KTO loss inline in ``KTOTrainer._compute_loss``
(``trl/trainer/kto_trainer.py``: the KL term at line 1443, the desirable and undesirable losses
at lines 1453 and 1470, their weights at 1480, the mean at 1548; trl 1.16); the test runs that
very method on a stand-in trainer and model that hand it fixed per-token log-probabilities.
"""

from __future__ import annotations

import json
import types
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lorakit.api import Example, Message, example_problem, read_source
from lorakit.errors import DataError, RecipeError
from lorakit.kto import kl_estimate, kto_losses, mismatched_rows, pack_answers
from lorakit.preference import Objective
from lorakit.recipe import load_recipe
from lorakit_plugins.sources.preference_jsonl import PreferenceJsonlSource

torch.set_num_threads(1)
KTO = 'train.objective="kto"'


def _per_token(n: int, seed: int, shift: float = 0.0):
    """Per-token log-probs of ``n`` sequences of 9 tokens, answers of different lengths."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, 9, dtype=torch.long)
    for i in range(n):
        start = 2 + i % 3
        mask[i, start : start + 2 + (i * 5) % 5] = 1
    values = -torch.rand(n, 8, generator=g, dtype=torch.float64) * 3 + shift
    return mask, values * mask[:, 1:]


def _trl_kto(beta, dw, uw, labels, policy, ref, kl_policy, kl_ref, loss_type="kto"):
    """TRL's ``KTOTrainer._compute_loss`` on these per-token log-probabilities: (loss,
    metrics)."""
    from trl import KTOTrainer

    mask, per_token = policy
    kl_mask, kl_per_token = kl_policy

    class Out:
        def __init__(self, log_probs):
            self.log_probs = log_probs
            self.entropy = torch.zeros_like(log_probs)
            self.mean_logits = torch.zeros_like(log_probs)

    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "KL_input_ids": torch.ones_like(kl_mask),
        "KL_attention_mask": torch.ones_like(kl_mask),
        "KL_completion_mask": kl_mask,
        "label": torch.tensor(labels),
        "ref_logps": ref,
        "ref_KL_logps": kl_ref,
    }

    def model(**kwargs):
        kl = kwargs["input_ids"] is inputs["KL_input_ids"]
        return Out(kl_per_token if kl else per_token)

    ident = SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t)
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=ident,
        aux_loss_enabled=False,
        calculate_KL=loss_type == "kto",
        precompute_ref_logps=True,
        loss_type=loss_type,
        beta=beta,
        desirable_weight=dw,
        undesirable_weight=uw,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(),
    )
    fake._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, fake)
    loss = KTOTrainer._compute_loss(fake, model, inputs, False)
    return float(loss), fake._metrics["train"]


@pytest.mark.parametrize(
    ("beta", "dw", "uw", "kl_shift"),
    [(0.1, 1.0, 1.0, 0.3), (0.5, 1.33, 1.0, 0.2), (0.2, 1.0, 2.5, -0.4)],
)
def test_the_kto_loss_matches_trl(beta, dw, uw, kl_shift):
    labels = [True, False, False, True, True, False]
    n = len(labels)
    policy = _per_token(n, seed=1)
    ref = _per_token(n, seed=2)[1].sum(dim=1)
    kl_policy = _per_token(n, seed=3, shift=kl_shift)
    kl_ref = _per_token(n, seed=3)[1].sum(dim=1)
    expected, metrics = _trl_kto(beta, dw, uw, labels, policy, ref, kl_policy, kl_ref)

    objective = Objective("kto", beta=beta, desirable_weight=dw, undesirable_weight=uw)
    z = kl_estimate(kl_policy[1].sum(dim=1), kl_ref).clamp(min=0)
    desirable = torch.tensor(labels)
    logps = policy[1].sum(dim=1)
    losses, rewards = kto_losses(objective, logps, ref, desirable, z)
    assert float(losses.mean()) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert float(z) == pytest.approx(metrics["kl"][0], rel=1e-12, abs=1e-12)
    assert (float(z) == 0.0) == (kl_shift < 0), "a negative estimate is clamped at 0"
    assert float(rewards[desirable].mean()) == pytest.approx(metrics["rewards/chosen"][0])
    assert float(rewards[~desirable].mean()) == pytest.approx(metrics["rewards/rejected"][0])


@pytest.mark.parametrize(("beta", "dw", "uw"), [(0.1, 1.0, 1.0), (0.5, 1.33, 0.8)])
def test_the_apo_zero_unpaired_loss_matches_trl(beta, dw, uw):
    """TRL's other KTO loss is the kto loss with the reference point at 0 (its KL is 0 whatever
    the mismatched rows say): lorakit computes it as such."""
    labels = [True, False, False, True, True, False]
    n = len(labels)
    policy = _per_token(n, seed=1)
    ref = _per_token(n, seed=2)[1].sum(dim=1)
    kl_policy = _per_token(n, seed=3, shift=0.5)
    kl_ref = _per_token(n, seed=3)[1].sum(dim=1)
    expected, metrics = _trl_kto(
        beta, dw, uw, labels, policy, ref, kl_policy, kl_ref, loss_type="apo_zero_unpaired"
    )
    objective = Objective(
        "kto", beta=beta, desirable_weight=dw, undesirable_weight=uw, kto_loss="apo_zero_unpaired"
    )
    desirable = torch.tensor(labels)
    logps = policy[1].sum(dim=1)
    losses, rewards = kto_losses(objective, logps, ref, desirable, torch.zeros(()))
    assert float(losses.mean()) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert metrics["kl"][0] == 0.0
    assert float(rewards[desirable].mean()) == pytest.approx(metrics["rewards/chosen"][0])
    # and TRL's kto loss on the same answers differs: its reference point is not 0 here
    with_kl, _ = _trl_kto(beta, dw, uw, labels, policy, ref, kl_policy, kl_ref)
    assert with_kl != pytest.approx(expected)


def test_the_reference_point_gets_no_gradient_and_each_loss_pulls_its_way():
    objective = Objective("kto", beta=0.5)
    logps = torch.tensor([-3.0, -3.0], dtype=torch.float64, requires_grad=True)
    kl_policy = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    z = kl_estimate(kl_policy, torch.tensor([-1.5, -2.5], dtype=torch.float64)).clamp(min=0)
    assert float(z) == pytest.approx(0.5) and not z.requires_grad
    losses, _ = kto_losses(objective, logps, torch.full((2,), -3.0), torch.tensor([True, False]), z)
    losses.sum().backward()
    # the desirable answer's loss falls as its log-probability rises; the undesirable's rises
    assert logps.grad[0] < 0 < logps.grad[1]
    assert kl_policy.grad is None


def _row(prompt: list[int], answer: list[int], desirable: bool, i: int) -> dict:
    return {
        "input_ids": [*prompt, *answer],
        "labels": [-100] * len(prompt) + answer,
        "desirable": desirable,
        "index": i,
        "reference": -float(i),
    }


def test_the_mismatched_rows_pair_each_prompt_with_the_previous_answer_as_trl_does():
    rows = [
        _row([1, 2], [10, 11], True, 0),
        _row([3], [20], False, 1),
        _row([4, 5, 6], [30], True, 2),
    ]
    kl = mismatched_rows(rows)
    # TRL: KL_completion_ids = [completion_ids[-1]] + completion_ids[:-1] (kto_trainer.py:1151)
    assert [r["input_ids"] for r in kl] == [[1, 2, 30], [3, 10, 11], [4, 5, 6, 20]]
    assert [r["labels"] for r in kl] == [[-100, -100, 30], [-100, 10, 11], [-100] * 3 + [20]]
    batch = pack_answers(rows)
    assert batch["examples"] == 3 and batch["desirable"].tolist() == [True, False, True]
    assert batch["reference"].tolist() == [0.0, -1.0, -2.0]
    assert batch["kl"]["cu_seq_lens_q"].tolist() == [0, 3, 6, 10]
    assert batch["kl"]["input_ids"].tolist() == [[1, 2, 30, 3, 10, 11, 4, 5, 6, 20]]
    alone = mismatched_rows(rows[:1])
    assert alone[0]["input_ids"] == rows[0]["input_ids"], "one answer is paired with itself"


def test_start_weights_give_the_starting_model_and_put_the_trained_weights_back():
    from lorakit.kto import StartWeights

    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    start = StartWeights(layer)
    x = torch.randn(4, 3)
    before = layer(x).detach()
    with torch.no_grad():
        layer.weight.add_(1.0)
    trained = layer(x).detach()
    with start.applied():
        assert torch.equal(layer(x), before)
    assert torch.equal(layer(x).detach(), trained)


# --------------------------------------------------------------------------- recipe


GOOD = """
[[data.sources]]
plugin = "chat_jsonl"
path = "chat.jsonl"
[train]
"""


def recipe(tmp_path: Path, train: str = ""):
    path = tmp_path / "r.toml"
    path.write_text(GOOD + train, encoding="utf-8")
    return load_recipe(path, ())


def problems(tmp_path: Path, train: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe(tmp_path, train)
    return info.value.problems


def test_kto_gets_trl_defaults_and_its_keys_are_checked(tmp_path):
    t = recipe(tmp_path, 'objective = "kto"').train
    assert (t.beta, t.desirable_weight, t.undesirable_weight) == (0.1, 1.0, 1.0)
    resolved = recipe(tmp_path, 'objective = "kto"\nundesirable_weight = 1.5').resolved()
    assert resolved["train"]["undesirable_weight"] == 1.5
    assert "desirable_weight" not in recipe(tmp_path).resolved()["train"], "SFT hashes as before"
    found = problems(tmp_path, 'objective = "kto"\ndesirable_weight = 0.0')
    assert found[0].startswith("[train].desirable_weight:")
    found = problems(tmp_path, 'objective = "dpo"\nundesirable_weight = 2.0')
    assert "train.undesirable_weight = 2.0 is not used by objective = 'dpo'" in found[0]
    found = problems(tmp_path, 'objective = "kto"\nloss_type = "ipo"')
    assert "train.loss_type = 'ipo' is not used by objective = 'kto'" in found[0]
    assert "KTO's loss is train.kto_loss" in found[0]
    found = problems(tmp_path, 'objective = "orpo"\nloss_type = "ipo"')
    assert "is not used by objective = 'orpo'" in found[0] and "kto_loss" not in found[0]
    found = problems(tmp_path, 'objective = "kto"\nper_device_train_batch_size = 1')
    assert "per_device_train_batch_size must be at least 2" in found[0]
    # kto_loss: recorded only when not the default (KTO runs hash as before it existed); the
    # unpaired APO loss needs no KL estimate, so a micro-batch of one answer is allowed
    assert "kto_loss" not in recipe(tmp_path, 'objective = "kto"').resolved()["train"]
    apo = 'objective = "kto"\nkto_loss = "apo_zero_unpaired"\nper_device_train_batch_size = 1'
    assert recipe(tmp_path, apo).resolved()["train"]["kto_loss"] == "apo_zero_unpaired"
    found = problems(tmp_path, 'objective = "dpo"\nkto_loss = "apo_zero_unpaired"')
    assert "train.kto_loss = 'apo_zero_unpaired' is not used by objective = 'dpo'" in found[0]
    found = problems(tmp_path, 'objective = "kto"\nkto_loss = "apo"')
    assert found[0].startswith("[train].kto_loss:")


# --------------------------------------------------------------------------- contract


def _answer(**kw) -> Example:
    base = {
        "id": "a",
        "messages": (Message("user", "q"), Message("assistant", "ok")),
        "label": True,
    }
    return Example(**{**base, **kw})


def test_the_labelled_answer_contract_and_its_split_file_round_trip():
    from lorakit.data.splits import content_key
    from lorakit.data.spool import example_from_json

    assert example_problem(_answer()) is None
    assert "True (desirable) or False" in example_problem(_answer(label=1))
    assert "either a pair" in example_problem(_answer(rejected=(Message("assistant", "no"),)))
    turns = (Message("user", "q"), Message("assistant", "a"), Message("user", "q2"))
    assert "must end with the assistant" in example_problem(_answer(messages=turns))
    ex = _answer(label=False)
    back = example_from_json(json.loads(json.dumps(ex.to_json())))
    assert back == ex
    assert content_key(ex) != content_key(_answer()), "the other label is another example"
    assert "label" not in Example(id="s", messages=ex.messages).to_json()


# --------------------------------------------------------------------------- the source


def read(tmp_path: Path, records: list, on_error: str = "fail"):
    write_jsonl(tmp_path / "p.jsonl", records)
    return read_source(
        PreferenceJsonlSource, {"path": "p.jsonl"}, recipe_dir=tmp_path, on_error=on_error
    )


def test_trl_unpaired_strings_and_messages_give_the_same_labelled_answer(tmp_path):
    records = [
        {"prompt": "hi?", "completion": "yes", "label": False},
        {
            "prompt": [{"role": "user", "content": "hi?"}],
            "completion": [{"role": "assistant", "content": "yes"}],
            "label": False,
        },
    ]
    examples = []
    for i, rec in enumerate(records):
        (ex,), _ = read(tmp_path / str(i), [rec])
        examples.append(ex)
    assert {(ex.messages, ex.label, ex.rejected) for ex in examples} == {
        ((Message("user", "hi?"), Message("assistant", "yes")), False, None)
    }
    assert examples[0].id == examples[1].id and examples[0].id.startswith("answer-")
    (good,), _ = read(tmp_path / "g", [{**records[0], "label": True}])
    assert good.id != examples[0].id


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"prompt": "q", "completion": "", "label": True}, "the completion is empty"),
        ({"prompt": "q", "completion": "x", "label": 1}, "label is 1, not a boolean"),
        ({"prompt": "q", "completion": "x", "label": "yes"}, 'label is "yes", not a boolean'),
        ({"prompt": "q", "completion": "x"}, "no 'label' field"),
        ({"prompt": "q", "label": True}, "no 'completion' field"),
        (
            {"prompt": "q", "completion": "x", "label": True, "chosen": "y"},
            "unknown field(s) chosen",
        ),
        (
            {"prompt": "q", "completion": [{"role": "user", "content": "x"}], "label": True},
            "completion must be one assistant answer",
        ),
    ],
)
def test_bad_unpaired_records_are_named_by_file_and_line(tmp_path, record, reason):
    good = {"prompt": "q", "completion": "x", "label": True}
    with pytest.raises(DataError) as info:
        read(tmp_path, [good, record])
    assert reason in str(info.value) and "p.jsonl:2" in str(info.value)
    examples, skipped = read(tmp_path, [good, record], on_error="skip")
    assert len(examples) == 1 and len(skipped) == 1 and skipped[0][0].endswith("p.jsonl:2")


def test_duplicate_answer_ids_are_reported_with_both_places(tmp_path, monkeypatch):
    from helpers import unpaired_records, with_preference_source
    from lorakit.data.pipeline import load_splits
    from lorakit.session import open_session

    with_preference_source(monkeypatch)
    answers = unpaired_records(5)
    write_jsonl(tmp_path / "p.jsonl", [*answers, answers[2]])
    path = tmp_path / "r.toml"
    path.write_text('[[data.sources]]\nplugin = "preference_jsonl"\npath = "p.jsonl"\n')
    session = open_session(path, ())
    with pytest.raises(DataError) as info:
        load_splits(session.components.sources, session.recipe.data, tmp_path)
    assert "duplicate id 'a2'" in str(info.value) and "p.jsonl:3" in str(info.value)


# --------------------------------------------------------------------------- tokenized answers


def _formatter():
    from lorakit.catalog import default_catalog

    entry = default_catalog().get("formatter", "chatml")
    return entry.factory(entry.options_class())


def test_answers_are_supervised_alone_pairs_split_in_two_and_long_ones_dropped_and_counted(
    data_tokenizer,
):
    from lorakit.data.report import DataReport
    from lorakit.data.unpaired import tokenize_answers

    prompt = (Message("user", "q1"), Message("assistant", "earlier answer"), Message("user", "q2"))
    pair = Example(
        id="p",
        messages=(*prompt, Message("assistant", "Bonjour")),
        rejected=(Message("assistant", "Tokyo"),),
    )
    bad = Example(id="u", messages=(*prompt, Message("assistant", "Paris")), label=False)
    long = Example(id="l", messages=(*prompt, Message("assistant", "hello " * 80)), label=True)
    report = DataReport()
    rows = tokenize_answers([pair, bad, long], _formatter(), data_tokenizer, 64, "drop", report)
    assert [r.desirable for r in rows] == [True, False, False]
    assert report.dropped == {"answer longer than train.max_length=64": 1}
    for row, answer in zip(rows, ("Bonjour", "Tokyo", "Paris"), strict=True):
        text = data_tokenizer.decode([t for t in row.labels if t != -100])
        assert text.startswith(answer) and "earlier" not in text, text
    with pytest.raises(DataError, match=r"over train\.max_length=64"):
        tokenize_answers([long], _formatter(), data_tokenizer, 64, "error", DataReport())
    sft = Example(id="x", messages=pair.messages)
    with pytest.raises(DataError, match="neither a labelled answer nor a preference pair"):
        tokenize_answers([sft], _formatter(), data_tokenizer, 64, "drop", DataReport())


def test_sft_learns_only_from_desirable_answers(data_tokenizer):
    from lorakit.data.pipeline import DataReport, tokenize_examples

    good = _answer()
    bad = _answer(id="b", messages=(Message("user", "q"), Message("assistant", "no")), label=False)
    report = DataReport()
    rows = tokenize_examples([good, bad], _formatter(), data_tokenizer, 64, "drop", report)
    assert len(rows) == 1
    assert report.dropped == {
        "undesirable answer (label false: only objective kto learns from it)": 1
    }


def test_weights_note_follows_the_kto_paper_range():
    from lorakit.data.unpaired import weight_note

    assert weight_note(10, 10, 1.0, 1.0) == ""
    assert weight_note(10, 30, 3.5, 1.0) == "", "desirable_weight in [3, 3.99]"
    note = weight_note(10, 30, 1.0, 1.0)
    assert "train.desirable_weight in [3.0, 3.99]" in note
    assert "train.undesirable_weight in [0.25, 0.33]" in note


def test_a_pair_objective_records_no_kto_key(tmp_path):
    resolved = recipe(tmp_path, 'objective = "dpo"').resolved()["train"]
    assert "desirable_weight" not in resolved and "undesirable_weight" not in resolved
    assert resolved["objective"] == "dpo" and "orpo_lambda" in resolved, "as before KTO"


# --------------------------------------------------------------------------- properties

PROPS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
unpaired = st.fixed_dictionaries(
    {
        "prompt": text.filter(lambda s: s.strip()),
        "completion": text.filter(lambda s: s.strip()),
        "label": st.booleans(),
    }
)


@PROPS
@given(recs=st.lists(unpaired, min_size=1, max_size=6))
def test_unpaired_records_round_trip_none_lost_or_duplicated(tmp_path, recs):
    from lorakit.data.spool import example_from_json

    records = [{**r, "id": f"r{i}"} for i, r in enumerate(recs)]
    examples, skipped = read(tmp_path, records)
    assert not skipped and [ex.id for ex in examples] == [r["id"] for r in records]
    for ex, rec in zip(examples, records, strict=True):
        assert ex.label is rec["label"] and ex.messages[-1].content == rec["completion"]
        assert ex.prompt == (Message("user", rec["prompt"]),)
        assert example_from_json(json.loads(json.dumps(ex.to_json()))) == ex


answer_rows = st.lists(
    st.tuples(
        st.lists(st.integers(0, 99), min_size=1, max_size=5),
        st.lists(st.integers(0, 99), min_size=1, max_size=5),
        st.booleans(),
    ),
    min_size=1,
    max_size=6,
)


@PROPS
@given(parts=answer_rows)
def test_each_mismatched_row_is_its_prompt_then_the_previous_answer_supervised(parts):
    rows = [_row(p, a, d, i) for i, (p, a, d) in enumerate(parts)]
    kl = mismatched_rows(rows)
    assert len(kl) == len(rows)
    for i, row in enumerate(kl):
        prompt, _, _ = parts[i]
        _, other, _ = parts[i - 1]
        assert row["input_ids"] == [*prompt, *other]
        assert [t for t in row["labels"] if t != -100] == other
        assert row["labels"][: len(prompt)] == [-100] * len(prompt)
    # the mismatched answers are the micro-batch's own answers, each once
    assert sorted(map(tuple, (p[1] for p in parts))) == sorted(
        tuple(t for t in r["labels"] if t != -100) for r in kl
    )


def test_check_refuses_kto_on_data_without_labels_and_names_the_fix(tmp_path, tiny_model_dir, cli):
    from helpers import chat_records, tiny_recipe

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(10))
    path = tiny_recipe(tmp_path, tiny_model_dir, data)
    code, _, err = cli("check", path, KTO)
    assert code == 2 and "Traceback" not in err
    assert "neither a labelled answer nor a preference pair" in err
    assert 'plugin = "preference_jsonl"' in err


def test_check_says_which_weights_suit_unbalanced_answers(
    tmp_path, tiny_model_dir, cli, monkeypatch
):
    from helpers import tiny_recipe, unpaired_records, with_preference_source

    with_preference_source(monkeypatch)
    records = [r for i, r in enumerate(unpaired_records(40)) if r["label"] or i % 4 == 1]
    data = write_jsonl(tmp_path / "answers.jsonl", records)
    path = tiny_recipe(tmp_path, tiny_model_dir, data)
    path.write_text(path.read_text().replace('"chat_jsonl"', '"preference_jsonl"'))
    code, out, err = cli("check", path, KTO)
    assert code == 0, err
    assert "note: " in out and "the KTO paper recommends EITHER train.desirable_weight in" in out
