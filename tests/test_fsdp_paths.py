"""The parts of lorakit's FSDP path that run without GPUs.

accelerate enables FSDP only on GPUs, so the whole path ran on a lent H100 only
(benchmarks/results/gpu_paths-h100-20261123.md). What is tested here: the adapter gathered from
real FSDP2 shards (torch's ``fully_shard`` over gloo in a one-process group on CPU), the eval
batch plan that keeps ranks in step, and accelerate's ``optimizer.bin`` in a checkpoint.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

GATHER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.distributed import gathered_trainable_state
    from lorakit.export.adapter_io import save_adapter

    base, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    plain = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    unsharded = gathered_trainable_state(model)
    assert sorted(unsharded) == sorted(plain)
    mesh = init_device_mesh("cpu", (1,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = [p for p in model.parameters() if p.requires_grad]
    state = gathered_trainable_state(model)
    tok = AutoTokenizer.from_pretrained(base)
    save_adapter(model, tok, out, {"test": True}, "<|im_end|>", state_dict=state)
    saved = load_file(str(out / "adapter_model.safetensors"))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out))
    again = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    print(json.dumps({
        "sharded": all(isinstance(p, DTensor) for p in sharded),
        "gathered_plain": all(type(t) is torch.Tensor for t in state.values()),
        "same_names": sorted(state) == sorted(plain),
        "equal": all(torch.equal(state[n], plain[n]) for n in plain),
        "saved": len(saved),
        "reloaded_equal": len(again) == len(plain) and all(
            torch.equal(again[n], plain[n]) for n in plain),
    }))
    dist.destroy_process_group()
    """
)


@pytest.mark.slow  # a real FSDP2 process: loads torch.distributed and the model in a child
def test_an_fsdp2_sharded_adapter_is_gathered_whole_and_loads_with_stock_peft(
    tmp_path, tiny_model_dir
):
    """FSDP2 keeps each LoRA weight as a DTensor shard (``save_pretrained`` of the sharded model
    fails); the gathered state saves an adapter that stock PEFT loads with the very weights the
    model had before sharding. (FSDP's own activation checkpointing is refused: its wrapper
    renames the layers, and PEFT's save then drops their weights; tested in test_distributed.)"""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "gather.py"
    script.write_text(GATHER)
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir), str(tmp_path / "adapter"), str(port)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {
        "sharded": True,
        "gathered_plain": True,
        "same_names": True,
        "equal": True,
        "saved": 8,  # q_proj and v_proj x lora_A/lora_B x 2 layers
        "reloaded_equal": True,
    }


@given(
    total=st.integers(0, 60),
    world=st.integers(1, 5),
    size=st.integers(1, 7),
    same=st.booleans(),
)
def test_eval_batches_cover_each_row_once_and_keep_sharded_ranks_in_step(total, world, size, same):
    from lorakit.loss import eval_batches

    plans = [eval_batches(total, world, r, size, same_count=same) for r in range(world)]
    rows = sorted(i for plan in plans for batch in plan for i in batch)
    assert rows == list(range(total))  # every row scored once, none twice
    assert all(len(b) <= size for plan in plans for b in plan)
    if same and world > 1:  # FSDP: every rank runs the same number of forwards
        assert len({len(plan) for plan in plans}) == 1
    else:  # DDP or one process: no stand-in batches
        assert all(batch for plan in plans for batch in plan)


def _checkpoint(folder: Path, optimizer_name: str) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.ones(2)}}}, folder / optimizer_name)
    torch.save({"last_epoch": 3}, folder / "scheduler.pt")
    return folder


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_accelerates_fsdp_optimizer_file_is_a_checkpoints_optimizer_state(tmp_path):
    """Under FSDP with a full state dict accelerate writes ``optimizer.bin``, not
    ``optimizer.pt``: such a checkpoint is whole, and the file gets the same pickle scan."""
    import zipfile

    from lorakit.checkpoints import checkpoint_problem

    fsdp = _checkpoint(tmp_path / "fsdp", "optimizer.bin")
    assert checkpoint_problem(fsdp) is None
    assert checkpoint_problem(_checkpoint(tmp_path / "ddp", "optimizer.pt")) is None
    (fsdp / "optimizer.bin").unlink()
    assert checkpoint_problem(fsdp) == "optimizer.pt is missing"
    with zipfile.ZipFile(fsdp / "optimizer.bin", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Exploit()))
    problem = checkpoint_problem(fsdp)
    assert problem is not None and problem.startswith("optimizer.bin is refused"), problem
