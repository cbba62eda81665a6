"""Which process this is under torchrun/accelerate (DDP, FSDP, DeepSpeed), and how ranks agree.

lorakit never runs its own distributed engine: torchrun (or ``accelerate launch``, which uses
it) starts one process per device, every process joins one ``torch.distributed`` process group
(gloo on CPU, nccl on CUDA), and the Trainer's accelerate backend does DDP. The core only needs
to know the local device, to let rank 0 alone write the run folder, and to make every rank take
the same decisions (which checkpoint, whether the run may start): rank 0 decides, the others
receive its answer, and an error on rank 0 stops every rank with a message instead of leaving
them waiting in a collective.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from lorakit.errors import LorakitError, RunError

T = TypeVar("T")

# How long a rank waits for the others in a collective before it gives up with an error.
TIMEOUT_S = int(os.environ.get("LORAKIT_DIST_TIMEOUT", "1800"))


class RankStopped(LorakitError):
    """Another rank failed; this one stops too (its own error was printed by that rank).

    Its exit code (3) tells the launcher this rank followed another one's failure, so the
    launcher's report names the rank that failed first (lorakit.launch).
    """

    exit_code = 3


# What the transports say when the process at the other end of a collective is gone (killed,
# crashed) or never answers: gloo (TCP), NCCL, and the TCP store the launcher keeps.
_PEER_GONE = re.compile(
    r"Connection (?:reset|closed) by peer|Socket Timeout"
    r"|Timed out waiting \d+ms|remote process exited|NCCL communicator was aborted"
    r"|Watchdog caught collective operation timeout",
    re.IGNORECASE,
)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)


def is_main() -> bool:
    return rank() == 0


def backend(device: str) -> str:
    """nccl for GPU tensors (with gloo beside it for the small CPU messages ranks exchange),
    gloo on CPU."""
    return "cuda:nccl,cpu:gloo" if device == "cuda" else "gloo"


def init(device: str) -> None:
    """Join the process group torchrun described in the environment; nothing in one process.

    The Trainer (through accelerate) finds the group initialised and uses it as it is. On CUDA
    each rank is pinned to its ``LOCAL_RANK`` GPU first: one model replica per device.
    """
    if world_size() <= 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise RunError(
                f"rank {rank()} has LOCAL_RANK {local_rank()} but this machine shows "
                f"{torch.cuda.device_count()} GPU(s)",
                fix="start at most one process per GPU (--nproc / --nproc-per-node)",
            )
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend(device), timeout=timedelta(seconds=TIMEOUT_S))


def active() -> bool:
    if world_size() <= 1:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank.

    If ``fn`` raises on rank 0, rank 0 raises it and every other rank raises ``RankStopped``:
    all ranks leave together instead of waiting for a rank that will never come.
    """
    if not active():
        return fn()
    import torch.distributed as dist

    result: Any = None
    failure: str | None = None
    error: BaseException | None = None
    if is_main():
        try:
            result = fn()
        except BaseException as exc:  # every rank must hear about it, whatever it is
            error = exc
            failure = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    box = [(result, failure)]
    dist.broadcast_object_list(box, src=0, device=_object_device())
    if error is not None:
        raise error
    result, failure = box[0]
    if failure is not None:
        raise RankStopped(
            f"rank {rank()} stopped: rank 0 failed ({failure})", fix="see rank 0's error above"
        )
    return result


def lost_peer(exc: BaseException) -> RankStopped | None:
    """``exc`` as a one-line ``RankStopped`` when it says another rank is gone, else None.

    When a rank is killed, the others fail in their next collective with a transport error
    (gloo: "Connection reset by peer"), raised from inside DDP's backward or a checkpoint's
    gather with a long traceback. The launcher's report names the rank that failed and how;
    this rank only says, in one line, that it stopped because of it.
    """
    if world_size() <= 1:
        return None
    import torch.distributed as dist

    seen: BaseException | None = exc
    while seen is not None:
        found = _PEER_GONE.search(str(seen))
        if found or isinstance(seen, (dist.DistNetworkError, dist.DistStoreError)):
            reason = found.group(0) if found else (str(seen).splitlines() or ["?"])[0][:200]
            return RankStopped(
                f"rank {rank()} stopped: it lost contact with the other processes ({reason})",
                fix="another rank ended first: its error, or the launcher's report, says which "
                "and why; continue with --resume-from-checkpoint auto",
            )
        seen = seen.__cause__ or seen.__context__
    return None


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order), None elsewhere; ``[obj]`` in one process."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def gathered_trainable_state(model: Any) -> dict[str, Any]:
    """The trainable weights as whole CPU tensors, gathered from however FSDP sharded them.

    FSDP2 (``fully_shard``) keeps each parameter as a ``DTensor`` holding this rank's shard,
    FSDP1 flattens them, and FSDP's activation checkpointing adds ``_checkpoint_wrapped_module``
    to the parameter names: a state dict read on rank 0 alone would hold shards under names
    PEFT does not know (and a gather on one rank would wait forever for the others). torch's
    ``get_model_state_dict`` undoes all three. Every rank must call this (each all-gathers in
    the same order); rank 0 receives the whole dict, with only the trainable (LoRA) weights,
    never the frozen base, which is all the adapter needs.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def _object_device() -> Any:
    import torch

    # the cpu:gloo side of the group carries Python objects, also when the GPUs use nccl
    return torch.device("cpu")


def batch_plan(
    train: Any, world: int, lengths: list[int], merge_tokens: int = 0, share_prefix: bool = False
) -> dict[str, Any]:
    """How one optimizer step's batch is made up over ``world`` ranks, and the sampler padding.

    Every rank trains on its own micro-batches (``accelerate`` hands batch i to rank i mod N).
    When the batches of an epoch do not divide evenly among the ranks, the sampler completes the
    last round with examples from the start of the epoch: those are trained twice in that epoch,
    and counted here (``padding_examples_per_epoch``, or ``padding_batches_per_epoch`` for
    token-budget batches, whose sizes vary). ``merge_tokens``: the micro-batches of a step run
    merged into packed rows of up to that many tokens (:func:`lorakit.packing.merge_budget`).
    ``share_prefix``: each packed row computes its examples' common prefix once
    (:mod:`lorakit.prefix_sharing`).
    """
    import math

    per_device = train.per_device_train_batch_size
    accumulation = train.gradient_accumulation_steps
    plan: dict[str, Any] = {
        "world_size": world,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
    }
    if train.packing:
        from lorakit.packing import TokenBudgetBatches

        budget = per_device * train.max_length
        batches = TokenBudgetBatches(lengths, budget, train.seed).count
        plan["tokens_per_device_batch"] = budget
        plan["global_batch_tokens"] = budget * accumulation * world
        plan["padding_batches_per_epoch"] = (-batches) % world if world > 1 else 0
    else:
        batches = math.ceil(len(lengths) / per_device)
        plan["global_batch_size"] = per_device * accumulation * world
        padded = world * math.ceil(batches / world) * per_device - len(lengths)
        plan["padding_examples_per_epoch"] = padded if world > 1 else 0
    plan["batches_per_epoch"] = batches
    if merge_tokens:
        plan["merged_micro_batch_tokens"] = merge_tokens
    if share_prefix:
        plan["shared_prefix"] = True
    return plan


def describe(plan: dict[str, Any]) -> str:
    text = _describe(plan)
    if merged := plan.get("merged_micro_batch_tokens"):
        text += (
            f"; the micro-batches of a step run merged into packed rows of up to {merged} "
            "tokens (train.merge_micro_batches: the same examples and loss, fewer passes)"
        )
    if plan.get("shared_prefix"):
        text += "; the prefix a row's examples share is computed once (train.share_prefix)"
    return text


def _describe(plan: dict[str, Any]) -> str:
    n, b, a = (
        plan["world_size"],
        plan["per_device_train_batch_size"],
        plan["gradient_accumulation_steps"],
    )
    if "global_batch_tokens" in plan:
        text = (
            f"{n} process(es) x {plan['tokens_per_device_batch']} tokens x {a} accumulation = "
            f"{plan['global_batch_tokens']} tokens per optimizer step"
        )
        pad = plan["padding_batches_per_epoch"]
        return text + (
            f" ({pad} batch(es) per epoch repeated to even out the ranks)" if pad else ""
        )
    text = f"{n} process(es) x {b} examples x {a} accumulation = global batch {plan['global_batch_size']}"
    pad = plan["padding_examples_per_epoch"]
    return text + (f" ({pad} example(s) per epoch repeated to even out the ranks)" if pad else "")


def fsdp_launch() -> bool:
    """Whether ``accelerate launch`` started this process with an FSDP config (which runs
    only on GPUs: :func:`check_engine` refuses it on CPU)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def check_engine(device: str) -> None:
    """Refuse an engine that accelerate would silently replace.

    ``accelerate launch`` with an FSDP or DeepSpeed config marks the workers
    (``ACCELERATE_USE_FSDP``/``ACCELERATE_USE_DEEPSPEED``), but accelerate enables either only on
    GPUs: on CPU the Trainer trains plain DDP instead, with every rank holding the whole model,
    which is not what the config promised. Also refuses what would save a wrong adapter on any
    device: FSDP's own activation checkpointing (its wrapper renames the layers' parameters,
    and PEFT picks the adapter's weights by module name) and DeepSpeed ZeRO-3 (partitioned
    weights, which lorakit's adapter save and evaluation do not gather).
    """
    flag = os.environ.get
    if flag("ACCELERATE_USE_FSDP", "").lower() == "true" and (
        flag("FSDP_ACTIVATION_CHECKPOINTING", "").lower() == "true"
    ):
        raise RunError(
            "the launch config turns on fsdp_activation_checkpointing: its wrapper renames every "
            "layer's parameters, and the saved adapter would miss their LoRA weights",
            fix="set fsdp_activation_checkpointing: false and train.gradient_checkpointing=true "
            "(lorakit check RECIPE --launch-config FILE checks the pair)",
        )
    if flag("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and (
        flag("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3"
    ):
        raise RunError(
            "DeepSpeed ZeRO-3 partitions the weights, and lorakit's adapter save and evaluation "
            "during training do not gather them",
            fix="use ZeRO stage 2, or FSDP (configs/accelerate_fsdp_lora.yaml) to shard the base",
        )
    if device != "cpu":
        return
    for env, engine in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(env, "false").lower() == "true":
            raise RunError(
                f"the launcher asked for {engine}, but accelerate runs {engine} only on GPUs: on "
                "this CPU it would silently train plain DDP, every rank holding the whole model",
                fix="on CPU launch without the FSDP/DeepSpeed config (lorakit run RECIPE --nproc N "
                "uses DDP over gloo); see docs/distributed.md",
            )
