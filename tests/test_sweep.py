"""``lorakit sweep``: the space file checked with key paths, and a real 4-trial sweep of the tiny
model (study in SQLite beside the runs, trials as run folders, pruning on eval loss, ranking,
compare, the prepared splits and the baseline reused, resumed by running it again)."""

from __future__ import annotations

import json
import sqlite3

import pytest
from helpers import tiny_recipe
from lorakit.errors import RecipeError
from lorakit.sweep import metric_value, open_sweep
from lorakit.sweep_space import read_space

SPACE = """
[sweep]
trials = 4
pruner = "successive_halving"
reduction_factor = 2
sampler = "random"
seed = 3

[space."train.learning_rate"]
low = 1e-5
high = 2e-2
log = true

[space."peft.r"]
choices = [2, 4]
"""


def test_the_space_file_is_checked_with_key_paths(tmp_path, tiny_model_dir, chat_file):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[sweep]\ntrials = 0\npruner = "asha"\n'
        '[space."data.val_fraction"]\nlow = 0.1\nhigh = 0.2\n'
        '[space."train.learning_rate"]\nlow = 0\nhigh = 1\nlog = true\n'
        '[space."peft.r"]\nchoices = []\n[extra]\n'
    )
    with pytest.raises(RecipeError) as err:
        read_space(bad)
    text = "\n".join(err.value.problems)
    assert "[sweep].trials" in text and "[sweep].pruner" in text and "[extra]" in text
    assert "data keys cannot be searched" in text and "a log range needs low > 0" in text
    assert "choices must be a non-empty list" in text
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file)
    space = tmp_path / "s.toml"
    space.write_text('[sweep]\nmetric = "bleu"\n[space."train.lerning_rate"]\nchoices = [0.1]\n')
    with pytest.raises(RecipeError) as err:
        open_sweep(recipe, [], read_space(space))
    text = "\n".join(err.value.problems)
    assert "lerning_rate" in text and "did you mean learning_rate" in text
    assert "[sweep].metric: 'bleu'" in text and "train.eval_steps" in text


def test_a_study_stays_a_folder_of_its_own_under_output_dir(tmp_path, tiny_model_dir, chat_file):
    """``[sweep] name = "../x"`` wrote the study outside output.dir, and a name that is a
    run's folder wrote the trials and study.db among that run's files."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file)
    space = tmp_path / "s.toml"
    space.write_text('[sweep]\nname = "../escaped"\n[space."peft.r"]\nchoices = [2]\n')
    with pytest.raises(RecipeError) as err:
        read_space(space)
    assert "[sweep].name" in "\n".join(err.value.problems) and "no '..'" in str(err.value)
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "run.json").write_text("{}")
    space.write_text('[sweep]\nname = "r1"\npruner = "off"\n[space."peft.r"]\nchoices = [2]\n')
    with pytest.raises(RecipeError) as err:
        open_sweep(recipe, [f"output.dir={json.dumps(str(tmp_path / 'runs'))}"], read_space(space))
    assert "is a run's folder" in str(err.value)


def test_a_string_choice_reaches_the_trial_as_written():
    """An emoji choice was trained as its JSON escape: TOML reads no surrogate escapes, and
    the override fell back to the escaped text as a raw string."""
    from lorakit.recipe_toml import parse_override
    from lorakit.sweep_space import toml_value

    for value in ["Be brief 😀", 'say "hi"\\n', "ünïcode", ["a", "😀"]]:
        assert parse_override(f"format.system_prompt={toml_value(value)}")[1] == value


@pytest.mark.slow
def test_a_four_trial_sweep_prunes_ranks_and_resumes(tmp_path, tiny_model_dir, chat_file, cli):
    recipe = tiny_recipe(
        tmp_path, tiny_model_dir, chat_file, extra='name = "tiny"\n[eval]\nmax_examples = 4\n'
    )
    (tmp_path / "sweep.toml").write_text(SPACE)
    args = ("sweep", recipe, "train.max_steps=6", "train.eval_steps=2", "train.save_steps=6")
    code, out, err = cli(*args, "--space", tmp_path / "sweep.toml")
    assert code == 0, err
    folder = tmp_path / "runs" / "tiny-sweep"
    assert (folder / "study.db").is_file() and (folder / "data" / "splits" / "val.jsonl").is_file()
    # the base model is scored once, for the sweep; every trial reuses that baseline
    assert err.count("scoring the base model") == 1, err
    ranked = json.loads((folder / "sweep.json").read_text())
    assert [r["trial"] for r in sorted(ranked, key=lambda r: r["trial"])] == [
        "t000",
        "t001",
        "t002",
        "t003",
    ]
    assert {r["state"] for r in ranked} <= {"COMPLETE", "PRUNED"}
    done = [r for r in ranked if r["state"] == "COMPLETE"]
    assert done and [r["eval_loss"] for r in done] == sorted(r["eval_loss"] for r in done)
    for r in ranked:
        run = folder / r["trial"]
        assert (run / "run.json").is_file() and r["run"] == str(run)
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        if r["state"] == "COMPLETE":  # a normal run folder, scored against the shared baseline
            assert metric_value(run, "eval_loss", "val") == pytest.approx(r["eval_loss"])
            assert (run / "baseline" / "eval_report.json").is_file() and max(steps) == 6
        else:  # stopped at an eval before the last step; not evaluated
            assert max(steps) < 6 and not (run / "eval_report.json").exists()
            assert "pruned at step" in err
    head = (
        "| rank | trial | state | eval_loss (val) | last eval_loss | train.learning_rate | peft.r |"
    )
    # the base model scored once (its val row, and its forgetting canary's general row)
    assert head in out and out.count("| (base) | val |") == 1
    assert out.count("| (base) | general |") == 1
    assert "lorakit compare" in out and "| t00" in out
    # every trial trained on the same prepared splits
    fingerprints = {
        json.loads((folder / r["trial"] / "data_report.json").read_text())["fingerprint"]
        for r in ranked
    }
    assert len(fingerprints) == 1
    # run again with one more trial: the study resumes, nothing is read or scored again
    code, out, err = cli(*args, "--space", tmp_path / "sweep.toml", "--trials", "5")
    assert code == 0, err
    assert "reusing the prepared splits" in err and "scoring the base model" not in err
    with sqlite3.connect(folder / "study.db") as db:
        assert db.execute("select count(*) from trials").fetchone()[0] == 5
    assert (folder / "t004" / "run.json").is_file()


@pytest.mark.parametrize("higher_is_better", [True, False], ids=["json_match", "eval_loss"])
def test_pruning_stops_the_trials_with_the_highest_eval_loss_whatever_the_metrics_direction(
    tmp_path, higher_is_better
):
    """The study runs in the main metric's direction (json_match: maximize) while trials are
    pruned on their eval loss: a loss reported as it is made a maximizing study prune the
    trials with the lowest loss and keep the worst. Reported in the study's direction, the
    highest loss is pruned either way, and the ranking shows the losses as they were."""
    from types import SimpleNamespace as NS

    import optuna
    from lorakit.sweep import loss_in_direction
    from lorakit.sweep_study import open_study, ranking

    folder = tmp_path / "s-sweep"
    folder.mkdir()
    sweep = NS(
        folder=folder,
        storage=f"sqlite:///{folder}/study.db",
        spec=NS(sweep=NS(pruner="median", reduction_factor=3, seed=0, sampler="random"), space=()),
        recipe=NS(train=NS(eval_steps=2)),
        metric="json_match" if higher_is_better else "eval_loss",
        higher_is_better=higher_is_better,
    )
    study = open_study(sweep)
    pruned = {}
    for loss in (1.0, 1.0, 1.0, 1.0, 0.2, 3.0):
        trial = study.ask()
        trial.report(loss_in_direction(sweep, loss), 2)
        pruned[loss] = trial.should_prune()
        if pruned[loss]:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, 0.5 if higher_is_better else loss)
    assert pruned[3.0] and not pruned[0.2]
    losses = [r["eval_losses"]["2"] for r in ranking(sweep, study)]
    assert sorted(losses) == [0.2, 1.0, 1.0, 1.0, 1.0, 3.0]


def test_a_sweep_ranks_the_trained_adapter_not_the_one_it_started_from(tmp_path):
    """A preference run from an SFT adapter reports the start adapter's scores before the
    tuned ones ("role": "start"); ranking a trial on the first adapter row gave every trial
    the same value. A trial whose evaluation scored nothing fails with the split named."""
    from lorakit.errors import RunError

    results = [
        {"adapter": None, "split": "val", "metrics": {"eval_loss": 2.0}},
        {"adapter": "/sft/adapter", "role": "start", "split": "val", "metrics": {"eval_loss": 1.5}},
        {"adapter": str(tmp_path / "adapter"), "split": "val", "metrics": {"eval_loss": 0.7}},
    ]
    (tmp_path / "eval_report.json").write_text(json.dumps({"results": results}))
    assert metric_value(tmp_path, "eval_loss", "val") == 0.7
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunError, match="scored nothing on val") as info:
        metric_value(empty, "eval_loss", "val")
    assert info.value.where == "[sweep].split"


def test_a_sweep_without_examples_to_rank_on_stops_before_any_trial(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """An empty ranking split (here val_fraction 0) let every trial train and then crash with
    a traceback; it is refused before the first trial, and no splits are kept for it."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "novals"\n')
    (tmp_path / "sweep.toml").write_text(SPACE)
    code, _out, err = cli(
        "sweep",
        recipe,
        "data.val_fraction=0.0",
        "train.eval_steps=2",
        "--space",
        tmp_path / "sweep.toml",
    )
    assert code == 2 and "Traceback" not in err
    assert "[sweep].split" in err and "data.val_fraction above 0" in err
    folder = tmp_path / "runs" / "novals-sweep"
    assert not (folder / "data").exists() and not (folder / "t000").exists()


def _fake_sweep(tmp_path, monkeypatch, metric="eval_loss", space=None, config="c1"):
    """A sweep of a fake recipe whose trials return 0.5 without training (their values are
    kept in ``ran``): the study's bookkeeping without a model."""
    from types import SimpleNamespace as NS

    from lorakit import sweep_study
    from lorakit.sweep import PreparedSplits
    from lorakit.sweep_space import Param

    folder = tmp_path / "s-sweep"
    ran: list[dict] = []

    def objective(_sweep, _prepared, _say):
        def run_trial(trial):
            ran.append({p.key: trial.suggest_float(p.key, p.low, p.high) for p in space_})
            return 0.5

        return run_trial

    space_ = space or (Param("train.learning_rate", low=1e-5, high=1e-2),)
    monkeypatch.setattr(
        sweep_study, "prepare", lambda *_: NS(source=PreparedSplits(NS(fingerprint="f1")))
    )
    monkeypatch.setattr(sweep_study, "objective", objective)
    sweep = NS(
        folder=folder,
        storage=f"sqlite:///{folder}/study.db",
        spec=NS(
            sweep=NS(pruner="off", reduction_factor=3, seed=0, sampler="random", trials=2),
            space=space_,
            path=tmp_path / "sweep.toml",
        ),
        recipe=NS(train=NS(eval_steps=2), config_hash=lambda: config),
        metric=metric,
        split="val",
        higher_is_better=metric == "json_match",
    )
    return sweep, ran


def test_a_study_resumed_with_other_settings_is_refused_naming_each_difference(
    tmp_path, monkeypatch
):
    """A study resumed with another metric took its old trials' eval losses for json_match
    values and ranked them in the other direction: what the trials are (recipe, data, space)
    and how they are ranked (metric, split, direction) is kept with the study and checked."""
    from lorakit.sweep_space import Param
    from lorakit.sweep_study import run_sweep

    sweep, ran = _fake_sweep(tmp_path, monkeypatch)
    assert run_sweep(sweep, print).user_attrs["metric"] == "eval_loss" and len(ran) == 2
    # more trials, same settings: resumed
    assert len(run_sweep(sweep, print, trials=3).trials) == 3 and len(ran) == 3
    other = (Param("train.learning_rate", low=1e-4, high=1e-2),)
    changed, _ = _fake_sweep(tmp_path, monkeypatch, "json_match", other, "c2")
    with pytest.raises(RecipeError) as err:
        run_sweep(changed, print, trials=4)
    text = "\n".join(err.value.problems)
    for what in ("[sweep].metric", "direction", "[space]", "config hash", "new name"):
        assert what in text, text
    assert "'eval_loss'" in text and "'json_match'" in text and "data fingerprint" not in text


def test_a_trial_left_running_by_a_killed_process_is_failed_and_tried_again(tmp_path, monkeypatch):
    """A trial left running by a killed process counted as running forever: the resume saw
    the study full and stopped before Optuna (which fails stale trials only as a trial
    starts) ever looked at it. It is failed, and its values are tried again."""
    import optuna
    from lorakit import sweep_study

    sweep, ran = _fake_sweep(tmp_path, monkeypatch)
    monkeypatch.setattr(sweep_study, "GRACE_S", 1)
    study = sweep_study.open_study(sweep)
    dead = study.ask()  # a process drew these values, then was killed
    lr = dead.suggest_float("train.learning_rate", 1e-5, 1e-2)
    study._storage.record_heartbeat(dead._trial_id)
    with sqlite3.connect(sweep.folder / "study.db") as db:
        db.execute("update trial_heartbeats set heartbeat = datetime('now', '-1 hour')")
    said: list[str] = []
    study = sweep_study.run_sweep(sweep, said.append, trials=1)
    state = optuna.trial.TrialState
    assert [t.state for t in study.trials] == [state.FAIL, state.COMPLETE]
    assert ran == [{"train.learning_rate": lr}]
    assert said == [
        "trial t000 was left running by a process that stopped: failed, its values are tried again"
    ]


@pytest.mark.slow
def test_a_failed_trial_is_told_in_one_line_with_its_reason(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """A diverged trial printed Optuna's traceback, then "failed: ?" (the reason was read
    where this Optuna never writes it), and sweep.json had no reason."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "div"\n')
    (tmp_path / "div.toml").write_text(
        '[sweep]\ntrials = 1\npruner = "off"\n[space."train.learning_rate"]\nchoices = [1e30]\n'
    )
    code, _out, err = cli("sweep", recipe, "train.max_steps=2", "--space", tmp_path / "div.toml")
    assert code == 0, err
    assert "Traceback" not in err and "failed: ?" not in err
    line = next(x for x in err.splitlines() if "trial t000 failed: " in x)
    [row] = json.loads((tmp_path / "runs" / "div-sweep" / "sweep.json").read_text())
    assert row["state"] == "FAIL" and row["reason"] and line.endswith(row["reason"])


@pytest.mark.slow
def test_a_sweep_without_a_pruner_keeps_the_eval_losses_by_step(
    tmp_path, tiny_model_dir, chat_file, cli
):
    """With pruner = "off" the eval losses were never reported to the trial, so sweep.json and
    the table lost them."""
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "nop"\n')
    (tmp_path / "nop.toml").write_text(
        '[sweep]\ntrials = 1\npruner = "off"\n[space."peft.r"]\nchoices = [2]\n'
    )
    args = ("sweep", recipe, "train.max_steps=2", "train.eval_steps=1")
    code, out, err = cli(*args, "--space", tmp_path / "nop.toml")
    assert code == 0, err
    [row] = json.loads((tmp_path / "runs" / "nop-sweep" / "sweep.json").read_text())
    assert row["state"] == "COMPLETE" and sorted(row["eval_losses"]) == ["1", "2"]
    assert "(step 2)" in out
