"""Several processes on CPU with gloo, through torchrun (``lorakit run --nproc``/``--nnodes``).

One 2-rank run (module fixture) serves most assertions; each rank records what it really
trained on and its LoRA weights in ``LORAKIT_TRACE_DIR`` (lorakit.rank_trace), outside the run
folder. Tiny model, one epoch of 31 examples, 4 optimizer steps.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from helpers import REPO, chat_records, tiny_recipe, write_jsonl

# dropout 0 and plain SGD at a constant rate: one step's update is lr x gradient, so comparing
# weights after step 1 compares gradients (Adam's first step would hide their scale)
COMMON = (
    "quant.dtype=fp32",
    "peft.dropout=0.0",
    "train.optim=sgd",
    "train.lr_scheduler_type=constant",
    "train.warmup_ratio=0",
    "train.max_grad_norm=1e6",
    'eval.metrics=["eval_loss"]',
)
EPOCH = ("train.max_steps=-1", "train.num_train_epochs=1", "train.eval_steps=2")


def lorakit(*args: str, env: dict | None = None, timeout: int = 400) -> subprocess.Popen:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "lorakit.cli.main", "run", *args],
        cwd=REPO,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: int = 400) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trace(folder: Path, rank: int) -> dict:
    return json.loads((folder / f"rank{rank}.json").read_text())


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("dist")
    data = write_jsonl(folder / "chat.jsonl", chat_records(40))
    recipe = tiny_recipe(folder, tiny_model_dir, data, extra='name = "ddp"')
    traces = folder / "trace"
    code, log = finish(
        lorakit(
            str(recipe), "--nproc", "2", *COMMON, *EPOCH, env={"LORAKIT_TRACE_DIR": str(traces)}
        )
    )
    assert code == 0, log
    return {
        "folder": folder,
        "recipe": recipe,
        "run": folder / "runs" / "ddp",
        "trace": traces,
        "log": log,
    }


@pytest.mark.slow
def test_two_ranks_write_one_run_folder_whose_adapter_loads_with_peft(two_ranks, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    runs = two_ranks["folder"] / "runs"
    assert [p.name for p in runs.iterdir()] == ["ddp"]
    run = two_ranks["run"]
    info = json.loads((run / "run.json").read_text())
    assert info["batch"] == {
        "world_size": 2,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "global_batch_size": 8,
        "padding_examples_per_epoch": 1,  # 31 examples in 8 batches of 4 over 2 ranks
        "batches_per_epoch": 8,
        "shared_prefix": True,  # each rank's rows share their examples' prefix on CPU
    }
    log = two_ranks["log"]
    assert log.count("global batch 8") == 1, "printed once, by rank 0"
    assert log.count("done: ") == 1
    # rank 0 wrote both ranks' RNG state; the checkpoint holds it before it is marked complete
    for step in (2, 4):
        ckpt = run / "checkpoints" / f"checkpoint-{step}"
        assert {"rng_state_0.pth", "rng_state_1.pth", "LORAKIT_COMPLETE"} <= {
            p.name for p in ckpt.iterdir()
        }
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [2, 4], "evaluated under 2 ranks"
    assert len([m for m in metrics if "loss" in m]) == 4, "one log line per step, rank 0 only"
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    assert any("lora_B" in name for name, _ in model.named_parameters())


@pytest.mark.slow
def test_replicas_end_with_identical_lora_weights(two_ranks):
    a = weights(two_ranks["trace"] / "rank0-final.safetensors")
    b = weights(two_ranks["trace"] / "rank1-final.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert (a[name] == b[name]).all(), name
    saved = weights(two_ranks["run"] / "adapter" / "adapter_model.safetensors")
    assert sum(float(t.abs().sum()) for t in saved.values()) > 0


@pytest.mark.slow
def test_each_example_is_trained_by_exactly_one_rank_per_epoch(two_ranks):
    n_train = json.loads((two_ranks["run"] / "data_report.json").read_text())["counts"]["train"]
    seen = {
        r: [i for b in trace(two_ranks["trace"], r)["batches"] for i in b["rows"]] for r in (0, 1)
    }
    assert seen[0] and seen[1], "both ranks trained"
    every = Counter(seen[0] + seen[1])
    assert set(every) == set(range(n_train)), "every example of the epoch was trained"
    repeated = sum(c - 1 for c in every.values())
    padding = json.loads((two_ranks["run"] / "run.json").read_text())["batch"]
    assert repeated == padding["padding_examples_per_epoch"] == 1, "only the sampler's padding"
    # apart from the padding example, the ranks' shares are disjoint
    assert len(set(seen[0]) & set(seen[1])) <= repeated


@pytest.mark.slow
def test_first_step_of_two_ranks_equals_one_rank_with_the_same_global_batch(
    two_ranks, tmp_path, cli, monkeypatch
):
    """2 ranks x 4 examples, against 1 rank x 4 examples x 2 accumulation steps: the same 8
    examples, the same token-weighted loss, so the same update up to fp32 summation order."""
    import torch

    one = tmp_path / "trace1"
    monkeypatch.setenv("LORAKIT_TRACE_DIR", str(one))
    code, _, err = cli(
        "run",
        two_ranks["recipe"],
        *COMMON,
        "train.max_steps=1",
        "train.gradient_accumulation_steps=2",
        f"output.dir={tmp_path}",
    )
    assert code == 0, err
    two = two_ranks["trace"]
    step1 = lambda t: sorted(i for b in t["batches"] if b["step"] == 1 for i in b["rows"])  # noqa: E731
    assert step1(trace(one, 0)) == sorted(step1(trace(two, 0)) + step1(trace(two, 1)))
    single = weights(one / "rank0-step1.safetensors")
    for rank in (0, 1):
        ddp = weights(two / f"rank{rank}-step1.safetensors")
        for name in single:
            # fp32, one SGD step of lr 5e-3: differences come only from summation order
            torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-7)
    assert any(float(t.abs().sum()) > 0 for k, t in single.items() if "lora_B" in k)


@pytest.mark.slow
def test_a_start_refused_on_rank_0_stops_every_rank(two_ranks):
    """The run folder exists: rank 0 refuses, rank 1 stops too instead of waiting for it."""
    code, log = finish(lorakit(str(two_ranks["recipe"]), *COMMON, *EPOCH, "--nproc", "2"), 200)
    assert code == 2, log
    assert "already holds a run" in log
    assert "rank 1 stopped: rank 0 failed" in log
    assert "Traceback" not in log


@pytest.mark.slow
def test_resume_under_two_ranks_and_a_changed_process_count(two_ranks, tmp_path, cli):
    runs = tmp_path / "runs"
    shutil.copytree(two_ranks["folder"] / "runs", runs)
    more = (
        *COMMON,
        *EPOCH[:1],
        "train.num_train_epochs=2",
        "train.eval_steps=2",
        f"output.dir={runs}",
    )
    code, _, err = cli("run", two_ranks["recipe"], *more, "--resume-from-checkpoint", "auto")
    assert code == 2 and "trained by 2 process(es), this resume has 1" in err, err
    code, log = finish(
        lorakit(str(two_ranks["recipe"]), *more, "--nproc", "2", "--resume-from-checkpoint", "auto")
    )
    assert code == 0, log
    info = json.loads((runs / "ddp" / "run.json").read_text())
    assert info["history"][-1]["event"] == "resume"
    assert info["history"][-1]["batch"]["world_size"] == 2
    meta = json.loads((runs / "ddp" / "adapter" / "lorakit.json").read_text())
    assert meta["global_step"] == 8


@pytest.mark.slow
def test_two_rank_qlora_4bit_completes(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data, quant="bnb-4bit", extra='name = "q"')
    code, log = finish(
        lorakit(str(recipe), "train.max_steps=2", 'eval.metrics=["eval_loss"]', "--nproc", "2")
    )
    assert code == 0, log
    assert "quant bnb-4bit" in log
    assert (tmp_path / "runs" / "q" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_two_nodes_on_localhost_complete(tmp_path, tiny_model_dir):
    """Two launchers, node ranks 0 and 1, one process each, meeting at a localhost rendezvous."""
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data, extra='name = "nodes"')
    port = str(free_port())
    nodes = [
        lorakit(
            str(recipe),
            "train.max_steps=2",
            'eval.metrics=["eval_loss"]',
            "--nnodes=2",
            f"--node-rank={k}",
            "--nproc=1",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
        )
        for k in (0, 1)
    ]
    results = [finish(p) for p in nodes]
    for code, log in results:
        assert code == 0, log
    info = json.loads((tmp_path / "runs" / "nodes" / "run.json").read_text())
    assert info["batch"]["world_size"] == 2
    assert (tmp_path / "runs" / "nodes" / "adapter" / "adapter_model.safetensors").is_file()


def test_fsdp_or_deepspeed_on_cpu_is_refused_not_replaced_by_ddp(monkeypatch):
    from lorakit.distributed import check_engine
    from lorakit.errors import RunError

    check_engine("cpu")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    check_engine("cuda")
    with pytest.raises(RunError, match="FSDP only on GPUs"):
        check_engine("cpu")


def test_engines_that_would_save_a_wrong_adapter_are_refused_on_gpus_too(monkeypatch):
    """FSDP's activation-checkpoint wrapper renames the layers (PEFT's save would drop their
    LoRA weights); ZeRO-3 partitions weights lorakit does not gather. Both stop at start."""
    from lorakit.distributed import check_engine
    from lorakit.errors import RunError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    with pytest.raises(RunError, match="fsdp_activation_checkpointing"):
        check_engine("cuda")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "false")
    check_engine("cuda")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(RunError, match="ZeRO-3"):
        check_engine("cuda")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    check_engine("cuda")


def test_batch_plan_counts_the_sampler_padding():
    import attrs
    from lorakit.distributed import batch_plan
    from lorakit.sections import TrainSection

    t = TrainSection(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    plan = batch_plan(t, 3, [10] * 30)  # 8 batches of 4 (the last of 2) over 3 ranks: 9 rounds
    assert plan["global_batch_size"] == 24
    assert plan["padding_examples_per_epoch"] == 3 * 3 * 4 - 30
    assert batch_plan(t, 1, [10] * 30)["padding_examples_per_epoch"] == 0
    packed = batch_plan(attrs.evolve(t, packing=True, max_length=20), 3, [10] * 30)
    assert packed["tokens_per_device_batch"] == 80 and packed["global_batch_tokens"] == 480
    assert packed["batches_per_epoch"] == 4 and packed["padding_batches_per_epoch"] == 2


def test_launcher_passes_the_run_line_to_torchrun():
    from argparse import Namespace

    from lorakit.launch import torchrun_argv

    args = Namespace(
        recipe="r.toml",
        overrides=["train.max_steps=2"],
        resume_from_checkpoint="auto",
        debug=False,
        nproc=2,
        nnodes=1,
        node_rank=0,
        master_addr="127.0.0.1",
        master_port=None,
    )
    assert torchrun_argv(args)[:4] == ["--standalone", "--nnodes", "1", "--nproc-per-node"]
    assert torchrun_argv(args)[-7:] == [
        "-m",
        "lorakit.cli.main",
        "run",
        "r.toml",
        "train.max_steps=2",
        "--resume-from-checkpoint",
        "auto",
    ]
    two = Namespace(**{**vars(args), "nnodes": 2, "node_rank": 1, "master_port": 1234})
    assert "--node-rank" in torchrun_argv(two) and "1234" in torchrun_argv(two)


def test_nproc_under_a_launcher_is_a_clear_error(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("LOCAL_RANK", "0")
    code, _, err = cli("run", tmp_path / "r.toml", "--nproc", "2")
    assert code == 2 and "already runs under a launcher" in err


@pytest.mark.parametrize("port", ["0", "-1", "65536", "99999"])
def test_a_master_port_outside_1_to_65535_is_refused_before_torchrun(cli, tmp_path, port):
    code, out, err = cli("run", tmp_path / "r.toml", "--nproc", "2", "--master-port", port)
    assert code == 2 and "Traceback" not in out + err
    assert f"--master-port {port}: give a TCP port from 1 to 65535" in err


def test_a_given_master_port_is_passed_as_it_is():
    from argparse import Namespace

    from lorakit.launch import resume_line, torchrun_argv

    args = Namespace(
        recipe="r.toml",
        overrides=[],
        resume_from_checkpoint=None,
        debug=False,
        nproc=1,
        nnodes=2,
        node_rank=0,
        master_addr="10.0.0.1",
        master_port=1,
    )
    line = torchrun_argv(args)
    assert line[line.index("--master-port") + 1] == "1"
    assert "--master-port 1 " in resume_line(args)
    unset = torchrun_argv(Namespace(**{**vars(args), "master_port": None}))
    assert unset[unset.index("--master-port") + 1] == "29500"


# ----------------------------------------------------------------------------- killed ranks


def rank_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the workers torchrun started in the ``launcher`` process (from /proc)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0") if ppid == launcher else []
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(proc.name)
    return found


def kill_rank(line: list[str], rank: int, ready, env: dict) -> dict:
    """Start ``lorakit`` with ``line`` (a 2-rank run), SIGKILL rank ``rank``'s process the
    moment ``ready()`` says something, and wait for the launcher (60 s at most: no collective
    may keep the other rank waiting for LORAKIT_DIST_TIMEOUT)."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit.cli.main", *line],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its workers too can be stopped if it hangs
    )
    seen, pid, killed_at = "", 0, 0.0
    try:
        while proc.poll() is None and not seen:
            seen = ready()
            if seen:
                pid = rank_pids(proc.pid)[rank]
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
            time.sleep(0.001)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert seen, f"the run ended before the kill (exit {proc.returncode}):\n{err}"
    return {
        "code": proc.returncode,
        "err": err,
        "out": out,
        "pid": pid,
        "seen": seen,
        "stop_s": time.monotonic() - killed_at,
    }


def stopped_clearly(result: dict, rank: int) -> list[str]:
    """The job stopped soon, in one line naming the killed rank, without a traceback; returns
    the resume command that line gives (without the leading ``lorakit``)."""
    import shlex

    err = result["err"]
    assert result["code"] == 2, err
    assert result["stop_s"] < 30, f"the job took {result['stop_s']:.0f} s to stop after the kill"
    assert "Traceback" not in err + result["out"], err
    report = [line for line in err.splitlines() if line.startswith("error: rank ")][-1]
    assert report.startswith(f"error: rank {rank} (pid {result['pid']}) was killed by SIGKILL"), err
    # the surviving rank, if it noticed before torchrun stopped it, says so in one line
    other = [line for line in err.splitlines() if line.startswith(f"error: rank {1 - rank} ")]
    assert all("stopped: it lost contact with the other processes" in o for o in other), err
    fix = err.split("continue from the last complete checkpoint: ", 1)[1].split(" (or start")[0]
    line = shlex.split(fix)
    assert line[:2] == ["lorakit", "run"] and line[-4:] == [
        "--nproc",
        "2",
        "--resume-from-checkpoint",
        "auto",
    ], fix
    return line[1:]


def marked_checkpoints(run: Path) -> list[str]:
    """Every checkpoint with a LORAKIT_COMPLETE marker reads back; returns the marked ones."""
    from lorakit.checkpoints import checkpoint_problem

    marked = sorted(p.parent for p in (run / "checkpoints").glob("*/LORAKIT_COMPLETE"))
    for ckpt in marked:
        assert checkpoint_problem(ckpt) is None, ckpt
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in ckpt.iterdir()}
    return [c.name for c in marked]


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_and_resume_ends_where_an_uninterrupted_run_does(
    two_ranks, tmp_path
):
    """Rank 1 killed after checkpoint-2, the resume's rank 0 killed as it writes checkpoint-4,
    resumed again, each time with the command the report gave: each kill stops the job in one
    line naming the rank, each resume continues from the newest complete checkpoint on both
    ranks, and the adapter is bit-identical to the uninterrupted 2-rank run of the same recipe
    (``two_ranks``: dropout 0, SGD, a seeded data order)."""
    from safetensors.torch import load_file

    run = tmp_path / "runs" / "ddp"
    ckpts = run / "checkpoints"
    traces = {"LORAKIT_TRACE_DIR": str(tmp_path / "trace")}

    def checkpoint_2() -> str:
        return "complete" if (ckpts / "checkpoint-2" / "LORAKIT_COMPLETE").exists() else ""

    def checkpoint_4() -> str:
        ckpt = ckpts / "checkpoint-4"
        if not ckpt.is_dir():
            return ""
        return "complete" if (ckpt / "LORAKIT_COMPLETE").exists() else "being written"

    # 1. rank 1 dies in step 3 or 4, once checkpoint-2 is complete
    args = [str(two_ranks["recipe"]), *COMMON, *EPOCH, f"output.dir={tmp_path / 'runs'}"]
    first = kill_rank(["run", *args, "--nproc", "2"], 1, checkpoint_2, {})
    resume = stopped_clearly(first, 1)
    assert resume[1 : 1 + len(args)] == args, "the report's command keeps the overrides"
    assert marked_checkpoints(run) == ["checkpoint-2"]

    # 2. its resume; rank 0 dies as soon as it starts writing checkpoint-4
    second = kill_rank(resume, 0, checkpoint_4, traces)
    assert f"resuming {run} from checkpoint-2" in second["err"], second["err"]
    assert stopped_clearly(second, 0) == resume
    marked = marked_checkpoints(run)
    assert marked in (["checkpoint-2"], ["checkpoint-2", "checkpoint-4"]), marked

    # 3. resume again: from checkpoint-2 when checkpoint-4 was cut short, else only finish
    code, log = finish(lorakit(*resume[1:], env=traces), 200)
    assert code == 0, log
    assert "Traceback" not in log
    if marked == ["checkpoint-2"]:
        assert "skipping checkpoint-4: no LORAKIT_COMPLETE marker" in log, log
        assert f"resuming {run} from checkpoint-2" in log, log
        # both ranks trained steps 3 and 4 on the rows the uninterrupted run gave them
        for r in (0, 1):
            rows = lambda t: [(b["step"], b["rows"]) for b in t["batches"] if b["step"] > 2]  # noqa: E731
            assert rows(trace(tmp_path / "trace", r)) == rows(trace(two_ranks["trace"], r)), r
    else:
        assert "checkpoint-4 is the last step (4): not training" in log, log
    ref = load_file(str(two_ranks["run"] / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert ref.keys() == got.keys() and ref
    differ = [k for k in ref if not ref[k].equal(got[k])]
    assert not differ, f"{len(differ)} tensors differ (checkpoint-4 was {second['seen']})"
    info = json.loads((run / "run.json").read_text())
    assert [h["event"] for h in info["history"]] == ["start", "resume", "resume"]


def test_the_launcher_names_the_rank_that_was_killed_not_the_one_that_followed(tmp_path):
    """Rank 0 noticed the lost peer and exited (RankStopped's code) in the same second torchrun
    saw rank 1 killed: torchrun's own pick (earliest, ties to the lowest rank) would be rank 0."""
    from argparse import Namespace

    from lorakit.distributed import RankStopped
    from lorakit.launch import _failure
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    none = str(tmp_path / "no-error-file")
    failures = {
        0: ProcessFailure(local_rank=0, pid=100, exitcode=RankStopped.exit_code, error_file=none),
        1: ProcessFailure(local_rank=1, pid=101, exitcode=-9, error_file=none),
    }
    failures[0].timestamp = failures[1].timestamp
    assert ChildFailedError("lorakit", failures).get_first_failure()[0] == 0
    args = Namespace(
        recipe="my recipe.toml",
        overrides=["train.max_steps=9", 'eval.metrics=["eval_loss"]'],
        nproc=2,
        nnodes=1,
    )
    error = _failure(ChildFailedError("lorakit", failures), args)
    assert error.message == (
        "rank 1 (pid 101) was killed by SIGKILL; the other 1 rank(s) on this machine stopped with it"
    )
    assert error.fix is not None
    assert "lorakit run 'my recipe.toml' train.max_steps=9 'eval.metrics=[\"eval_loss\"]' " in (
        error.fix
    )
    assert "--nproc 2 --resume-from-checkpoint auto" in error.fix
    # every rank followed another (a timeout everywhere): the earliest is named
    failures[1] = ProcessFailure(local_rank=1, pid=101, exitcode=3, error_file=none)
    failures[1].timestamp = failures[0].timestamp - 1
    assert _failure(ChildFailedError("lorakit", failures), args).message.startswith("rank 1 ")


def test_a_lost_peer_is_one_line_and_other_errors_stay_what_they_are(monkeypatch):
    import torch.distributed as dist
    from lorakit.distributed import RankStopped, lost_peer

    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
        "[127.0.0.1]:14252: Connection reset by peer. This is typically caused by ..."
    )
    assert lost_peer(gloo) is None, "one process: no peer to lose"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    stopped = lost_peer(gloo)
    assert isinstance(stopped, RankStopped) and stopped.exit_code == 3
    assert stopped.message == (
        "rank 1 stopped: it lost contact with the other processes (Connection reset by peer)"
    )
    try:
        try:
            raise dist.DistStoreError("[c10d] barrier: store went away")
        except dist.DistStoreError as inner:
            raise RuntimeError("checkpoint save failed") from inner
    except RuntimeError as outer:
        found = lost_peer(outer)
    assert found is not None and "([c10d] barrier: store went away)" in found.message
    assert lost_peer(ValueError("a bug in a plugin")) is None
    # a rank's own backend failure (out of memory in a collective, say) stays its own error
    assert (
        lost_peer(dist.DistBackendError("NCCL error: unhandled cuda error (out of memory)")) is None
    )
