"""The reference log-probabilities computed in each step, from the step's own packed row
(``train.reference_logps = "every_step"``, ``lorakit.preference.StepReference``; issue 23).

A reference computed once before training packs the answers in other batches than the steps'
rows. In bf16 a matmul's rounding depends on the batch shape on CPUs with AMX/AVX512-BF16, so an
answer's summed log-probability moves with the packing (up to ~1 nat on SmolLM2-135M): noise in
``policy - reference``. Computed in the step, the reference scores the policy's own row, so with
a fresh adapter (which adds exactly nothing) the first step's policy and reference are the same
bits in fp32 and in bf16: rewards exactly 0, DPO's loss exactly ln 2, KTO's exactly 0.5.

The bit-for-bit tests use a wider tiny model (hidden 512), where an AMX Xeon's bf16 matmuls
do round with the batch shape (:func:`bf16_rounds_with_batch_shape`): on such a CPU
``test_once_in_bf16_is_not_exact_where_the_cpu_rounds_with_batch_shape`` shows the reference
computed once is *not* exact on the same runs, so the exactness tests can tell the two apart
(elsewhere it skips, saying why, and the tests use the narrow tiny model: see
:func:`wide_model_dir`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import (
    assert_seeded_and_resumes,
    build_tiny_model,
    logged_steps,
    preference_records,
    run_adapter,
    tiny_recipe,
    unpaired_records,
    with_preference_source,
    write_jsonl,
)

pytestmark = pytest.mark.slow

LN2 = float.fromhex("0x1.62e430p-1")  # ln 2 in fp32, as the step computes it


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The 512-wide tiny model where the CPU has bf16 instructions. Elsewhere bf16 is
    emulated: it rounds the same whatever the batch shape, so width buys nothing there, and it
    costs ~100x fp32, so the narrow tiny model tests the same exactness in a fraction of the
    time."""
    from lorakit.device import BF16_FLAGS, cpu_flags

    if not any(flag in cpu_flags() for flag in BF16_FLAGS):
        return tiny_model_dir
    return build_tiny_model(tmp_path_factory.mktemp("wide-llama"), hidden=512)


def bf16_rounds_with_batch_shape(model_dir: Path) -> bool:
    """Does this CPU round the model's bf16 forward differently when the same answers are
    packed 8 to a row and 1 to a row? (Yes on the AMX Xeons measured, at hidden 512: oneDNN
    picks its kernel by the number of rows.)"""
    import torch
    from helpers import load_tiny_model
    from lorakit.attention import packed_attention
    from lorakit.packing import pack
    from lorakit.preference import sequence_logps

    model = load_tiny_model(model_dir).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(8):
        ids = torch.randint(5, model.config.vocab_size, (60,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 30 + ids[30:]})
    with torch.no_grad(), packed_attention(model, "cpu"):
        together = sequence_logps(model, pack(rows), True)[0]
        alone = torch.cat([sequence_logps(model, pack([r]), True)[0] for r in rows])
    return not torch.equal(together, alone)


def _recipe(
    tmp_path: Path, model_dir: Path, records: list[dict], dtype: str, quant: str = "none"
) -> Path:
    data = write_jsonl(tmp_path / "prefs.jsonl", records)
    return tiny_recipe(
        tmp_path, model_dir, data, dtype=dtype, quant=quant, source="preference_jsonl"
    )


def _first_step(cli, recipe: Path, runs: Path, name: str, *overrides: str) -> tuple[dict, str]:
    code, _, err = cli("run", recipe, f"output.name={name}", "train.max_steps=1", *overrides)
    assert code == 0, err
    return logged_steps(runs / name)[0], err


def _records(objective: str) -> list[dict]:
    return preference_records(24) if objective == "dpo" else unpaired_records(24)


@pytest.mark.parametrize(
    ("objective", "quant"),
    [("dpo", "none"), ("kto", "none"), ("dpo", "bnb-4bit"), ("dpo", "bnb-8bit")],
)
def test_a_fresh_adapters_first_step_sees_the_reference_exactly(
    tmp_path, wide_model_dir, cli, monkeypatch, compute_dtype, objective, quant
):
    """LoRA, QLoRA (NF4) and 8-bit: the reference forward is the policy's in the step's
    arithmetic (bitsandbytes' 8-bit layers evaluate with int8 activations, and train with the
    dequantized weight: the reference must take the training path)."""
    with_preference_source(monkeypatch)
    recipe = _recipe(tmp_path, wide_model_dir, _records(objective), compute_dtype, quant)
    exact = LN2 if objective == "dpo" else 0.5
    runs = tmp_path / "runs"
    every = ('train.reference_logps="every_step"', f'train.objective="{objective}"')
    first, err = _first_step(cli, recipe, runs, "every", *every)
    assert "reference log-probabilities: in each step" in err
    assert "reference log-probabilities of" not in err, "nothing is computed before training"
    assert first["loss"] == exact, first
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0, first
    meta = json.loads((runs / "every" / "adapter" / "lorakit.json").read_text())
    assert meta["reference_logps"] == "every_step", "the run records what it did"
    # auto: in each step in bf16, once in fp32
    _, err = _first_step(cli, recipe, runs, "auto", f'train.objective="{objective}"')
    assert ("in each step" in err) == (compute_dtype == "bf16")
    meta = json.loads((runs / "auto" / "adapter" / "lorakit.json").read_text())
    assert meta["reference_logps"] == ("every_step" if compute_dtype == "bf16" else "once")


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_once_in_bf16_is_not_exact_where_the_cpu_rounds_with_batch_shape(
    tmp_path, wide_model_dir, cli, monkeypatch, objective
):
    """What ``every_step`` fixes, shown on this CPU: the reference computed once, in other
    batches than the step's, is not the policy's bits at the first step. Skipped where this
    CPU's bf16 forward does not depend on the batch shape (emulated bf16)."""
    if not bf16_rounds_with_batch_shape(wide_model_dir):
        pytest.skip("this CPU's bf16 matmuls round the same whatever the batch shape")
    with_preference_source(monkeypatch)
    recipe = _recipe(tmp_path, wide_model_dir, _records(objective), "bf16")
    exact = LN2 if objective == "dpo" else 0.5
    runs = tmp_path / "runs"
    once = ('train.reference_logps="once"', f'train.objective="{objective}"')
    first, err = _first_step(cli, recipe, runs, "once", *once)
    assert "note: objective" in err and 'reference_logps = "every_step"' in err
    assert first["loss"] != exact, first
    first, _ = _first_step(cli, recipe, runs, "auto", f'train.objective="{objective}"')
    assert first["loss"] == exact, first


@pytest.mark.parametrize("compute_dtype", ["fp32", "bf16"])
def test_the_reference_computes_as_the_policy_does_in_training_and_in_evaluation(
    tiny_model_dir, compute_dtype
):
    """A start adapter that adds something (a ``from_adapter`` run): the reference, with the
    start's weights still in place, gives the policy's log-probabilities bit for bit, in a
    training step (fused layers, dropout off) and in evaluation (PEFT's eval forward: in bf16
    it rounds the LoRA branch otherwise than the fused layers do)."""
    import torch
    from lorakit.attention import packed_attention
    from lorakit.fast_dropout import FastDropout, use_fast_dropout
    from lorakit.fused_lora import use_fused_lora
    from lorakit.packing import pack
    from lorakit.preference import StepReference, sequence_logps
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[compute_dtype]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    use_fast_dropout(model)
    use_fused_lora(model)
    reference = StepReference(model)
    assert reference.start is not None, "a start that adds something: its weights are kept"
    g = torch.Generator().manual_seed(2)
    rows = []
    for _ in range(3):
        ids = torch.randint(5, 300, (40,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 20 + ids[20:]})
    batch = pack(rows)
    drops = [m for m in model.modules() if isinstance(m, FastDropout)]
    with torch.no_grad(), packed_attention(model, "cpu"):
        model.train()
        for d in drops:  # the training step's forward, without its dropout
            d.threshold = 0
        policy = sequence_logps(model, batch, True)[0]
        for d in drops:
            d.threshold = round(0.1 * 65536)
        assert torch.equal(reference.logps(batch, True), policy.float())
        assert model.training and all(m.training for m in model.modules())
        model.eval()
        policy = sequence_logps(model, batch, True)[0]
        assert torch.equal(reference.logps(batch, True), policy.float())
        assert not any(m.training for m in model.modules())


def test_every_step_is_seeded_and_resumes_exactly(
    tmp_path, tiny_model_dir, cli, monkeypatch, compute_dtype
):
    """Determinism and exact resume with the reference in each step, in both dtypes (the
    reference has no state: a resumed run scores each step's row as the uninterrupted run)."""
    with_preference_source(monkeypatch)
    recipe = _recipe(tmp_path, tiny_model_dir, preference_records(60), compute_dtype)
    common = [
        'train.objective="dpo"',
        'train.reference_logps="every_step"',
        'train.lr_scheduler_type="constant"',
        "train.save_steps=2",
    ]
    resumed, full = assert_seeded_and_resumes(cli, recipe, tmp_path / "runs", common)
    assert resumed["rewards/margins"] == full["rewards/margins"]
    assert full["rewards/margins"] != 0.0, "the run trained away from the reference"


def test_every_step_from_an_sft_adapter_keeps_it_as_the_reference(
    tmp_path, tiny_model_dir, cli, monkeypatch, compute_dtype
):
    """A ``from_adapter`` start: the reference sets the adapter's starting weights back for one
    forward and puts the trained ones back. Without dropout the first step's policy is the
    start exactly (rewards 0), training still moves the adapter, and a resumed run equals the
    uninterrupted one."""
    with_preference_source(monkeypatch)
    recipe = _recipe(tmp_path, tiny_model_dir, preference_records(60), compute_dtype)
    runs = tmp_path / "runs"
    # no dropout (the DPO run keeps the SFT adapter's LoRA settings)
    code, _, err = cli("run", recipe, "output.name=sft", "train.max_steps=6", "peft.dropout=0.0")
    assert code == 0, err
    dpo = [
        'train.objective="dpo"',
        'train.from_adapter="runs/sft"',
        'train.reference_logps="every_step"',
        "train.learning_rate=1e-2",
        "train.max_steps=3",
    ]
    code, _, err = cli("run", recipe, "output.name=dpo", *dpo)
    assert code == 0, err
    steps = logged_steps(runs / "dpo")
    assert steps[0]["rewards/chosen"] == 0.0 and steps[0]["loss"] == LN2, steps[0]
    # the start was put back after each reference forward: the policy trains away from it
    assert steps[-1]["rewards/margins"] != 0.0 and not math.isclose(steps[-1]["loss"], LN2)
    # a resumed run keeps the start it was built from (the checkpoint's weights are loaded
    # after the reference took its copy): the uninterrupted run's adapter
    common = [a for a in dpo if not a.startswith("train.max_steps")]
    common += ['train.lr_scheduler_type="constant"', "train.save_steps=2"]
    assert_seeded_and_resumes(cli, recipe, runs, common)


def test_reference_logps_is_checked_and_recorded_only_when_set(tmp_path, cli):
    from lorakit.errors import RecipeError
    from lorakit.recipe import load_recipe

    path = tmp_path / "r.toml"
    base = '[[data.sources]]\nplugin = "chat_jsonl"\npath = "c.jsonl"\n[train]\n'
    path.write_text(base + 'objective = "orpo"\nreference_logps = "every_step"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ())
    assert "train.reference_logps = 'every_step' is not used by objective = 'orpo'" in str(
        info.value.problems
    )
    path.write_text(base + 'objective = "dpo"\nreference_logps = "sometimes"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ())
    assert "reference_logps" in info.value.problems[0] and "every_step" in info.value.problems[0]
    path.write_text(base + 'objective = "dpo"\n')
    assert "reference_logps" not in load_recipe(path, ()).resolved()["train"]
    path.write_text(base + 'objective = "dpo"\nreference_logps = "once"\n')
    assert load_recipe(path, ()).resolved()["train"]["reference_logps"] == "once"


@pytest.mark.parametrize(
    ("mode", "dtype", "sharded", "in_step"),
    [
        ("auto", "bf16", False, True),
        ("auto", "fp16", False, True),
        ("auto", "fp32", False, False),
        ("auto", "bf16", True, False),  # FSDP: no weights set back on a sharded model
        ("every_step", "fp32", False, True),
        ("once", "bf16", False, False),
    ],
)
def test_when_the_reference_is_computed_in_each_step(mode, dtype, sharded, in_step):
    from lorakit.preference import reference_in_step

    assert reference_in_step(mode, dtype, sharded) is in_step


def test_a_resumed_run_keeps_the_reference_mode_it_started_with(
    tmp_path, tiny_model_dir, cli, monkeypatch
):
    """run.json records when the reference is computed, and a resume keeps that mode even
    where ``auto`` now resolves otherwise. A bf16 run started before lorakit recorded it (its
    run.json and resolved.json have no ``reference_logps``) computed its reference once: resumed
    with ``auto``, which is ``every_step`` in bf16 today, it keeps ``once`` and ends with the
    uninterrupted ``once`` run's adapter."""
    with_preference_source(monkeypatch)
    recipe = _recipe(tmp_path, tiny_model_dir, preference_records(60), "bf16")
    runs = tmp_path / "runs"
    common = ['train.objective="dpo"', 'train.lr_scheduler_type="constant"', "train.save_steps=2"]
    once = 'train.reference_logps="once"'
    code, _, err = cli("run", recipe, "output.name=full", "train.max_steps=4", *common, once)
    assert code == 0, err
    code, _, err = cli("run", recipe, "output.name=auto", "train.max_steps=1", *common)
    assert code == 0, err
    assert json.loads((runs / "auto/run.json").read_text())["reference_logps"] == "every_step"
    code, _, err = cli("run", recipe, "output.name=split", "train.max_steps=2", *common, once)
    assert code == 0, err
    # what an older lorakit left: no record of the mode; the recipe's auto
    for name, drop in (
        ("run.json", lambda d: d.pop("reference_logps")),
        ("resolved.json", lambda d: d["train"].pop("reference_logps")),
    ):
        path = runs / "split" / name
        data = json.loads(path.read_text())
        assert drop(data) == "once"
        path.write_text(json.dumps(data))
    resume = ("train.max_steps=4", *common, "--resume-from-checkpoint", "auto")
    code, _, err = cli("run", recipe, "output.name=split", *resume)
    assert code == 0, err
    assert 'reference log-probabilities: "once", as the run started' in err, err
    assert "in each step" not in err and "computed once as the run started" in err, err
    meta = json.loads((runs / "split/adapter/lorakit.json").read_text())
    assert meta["reference_logps"] == "once"
    full, split = run_adapter(runs / "full"), run_adapter(runs / "split")
    assert all(full[k].equal(split[k]) for k in full), "the resume changed the reference mode"
    assert logged_steps(runs / "split")[-1]["loss"] == logged_steps(runs / "full")[-1]["loss"]


def test_once_resumes_exactly_when_the_eval_batch_size_changes(
    tmp_path, wide_model_dir, cli, monkeypatch
):
    """The reference computed once is recomputed by a resumed run, in batches that depend on
    the pairs alone (``preference.REFERENCE_TOKENS``), not on ``per_device_eval_batch_size``,
    which a resume may change: in bf16, where a CPU may round with the batch shape, the resumed
    run still ends with the uninterrupted run's adapter."""
    with_preference_source(monkeypatch)
    recipe = _recipe(tmp_path, wide_model_dir, preference_records(60), "bf16")
    runs = tmp_path / "runs"
    common = [
        'train.objective="dpo"',
        'train.reference_logps="once"',
        'train.lr_scheduler_type="constant"',
        "train.save_steps=2",
    ]
    code, _, err = cli("run", recipe, "output.name=full", "train.max_steps=4", *common)
    assert code == 0, err
    code, _, err = cli("run", recipe, "output.name=split", "train.max_steps=2", *common)
    assert code == 0, err
    resume = ("train.max_steps=4", "train.per_device_eval_batch_size=1", "--resume-from-checkpoint")
    code, _, err = cli("run", recipe, "output.name=split", *common, *resume, "auto")
    assert code == 0, err
    assert "resuming" in err and "checkpoint-2" in err
    full, split = run_adapter(runs / "full"), run_adapter(runs / "split")
    assert all(full[k].equal(split[k]) for k in full), "the resumed reference differs"
