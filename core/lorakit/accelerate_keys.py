"""What ``accelerate launch --config_file`` accepts (accelerate 1.15), as data, without accelerate.

Importing accelerate imports torch, and ``lorakit check`` never does; so the keys and values are
written down here, read from the installed accelerate's source:

* top-level keys: the fields of ``ClusterConfig`` and ``BaseConfig``
  (``commands/config/config_args.py``), plus ``fp16`` and ``dynamo_backend``, old spellings that
  ``BaseConfig.process_config`` still converts;
* ``fsdp_config`` keys: the ``--fsdp_*`` options of ``commands/launch.py`` (launch adds the
  ``fsdp_`` prefix to a key without it) and ``fsdp_ignored_modules`` (read by ``utils/launch.py``);
* ``deepspeed_config`` keys: the options of launch.py's DeepSpeed argument group;
* values: ``DistributedType``, ``PrecisionType``, ``utils/constants.py`` (``FSDP_*``) and how
  ``FullyShardedDataParallelPlugin.__post_init__`` and ``str_to_bool`` parse them.

``tests/test_launch_config.py`` compares these tables with the installed accelerate, so an
upgrade that adds or renames a key fails there instead of being refused here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

# a checker returns what is wrong with a value ("expected ..."), or None when it is fine
Checker = Callable[[Any], "str | None"]

DISTRIBUTED_TYPES = (
    "NO",
    "MULTI_CPU",
    "MULTI_GPU",
    "MULTI_NPU",
    "MULTI_MLU",
    "MULTI_SDAA",
    "MULTI_MUSA",
    "MULTI_XPU",
    "DEEPSPEED",
    "FSDP",
    "XLA",
    "MEGATRON_LM",
    "MULTI_HPU",
    "MULTI_NEURON",
)
MIXED_PRECISION = ("no", "fp16", "bf16", "fp8")
SHARDING_STRATEGY = (
    "FULL_SHARD",
    "SHARD_GRAD_OP",
    "NO_SHARD",
    "HYBRID_SHARD",
    "HYBRID_SHARD_ZERO2",
)
AUTO_WRAP_POLICY = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
BACKWARD_PREFETCH = ("BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH")
STATE_DICT_TYPE = ("FULL_STATE_DICT", "LOCAL_STATE_DICT", "SHARDED_STATE_DICT")
TRUE_WORDS = ("y", "yes", "t", "true", "on", "1")  # accelerate's str_to_bool
FALSE_WORDS = ("n", "no", "f", "false", "off", "0")


def truth(value: Any) -> bool | None:
    """``value`` as accelerate's ``str_to_bool`` reads it (launch passes ``str(v).lower()``)."""
    word = str(value).lower()
    return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None


def flag(value: Any) -> str | None:
    """A switch accelerate reads through ``str_to_bool``: true/false (or yes/no, on/off, 1/0)."""
    return None if truth(value) is not None else "expected true or false"


def strict_bool(value: Any) -> str | None:
    """A switch accelerate reads as a Python truth value: the string "false" would mean true."""
    return None if isinstance(value, bool) else "expected true or false (unquoted)"


def choice(names: Iterable[str], *, numbered: bool = False) -> Checker:
    """One of ``names`` in any case (accelerate upper-cases them); ``numbered``: also 1..N."""
    names = tuple(names)

    def check(value: Any) -> str | None:
        if isinstance(value, str) and value.upper() in names:
            return None
        if numbered and str(value).isdigit() and 1 <= int(value) <= len(names):
            return None
        return "expected one of " + ", ".join(names)

    return check


def exact(*names: str) -> Checker:
    def check(value: Any) -> str | None:
        return (
            None
            if str(value) in names and not isinstance(value, bool)
            else ("expected one of " + ", ".join(names))
        )

    return check


def integer(low: int, high: int | None = None) -> Checker:
    def check(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and value >= low and (high is None or value <= high):
            return None
        return f"expected an integer from {low}" + (f" to {high}" if high is not None else " up")

    return check


def processes(value: Any) -> str | None:
    """``num_processes``: 1 or more, or -1 (ClusterConfig's default: given at launch)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or value == -1)
    return None if ok else "expected a positive integer (all processes over all machines)"


def text(value: Any) -> str | None:
    return None if isinstance(value, str) else "expected a string"


def table(value: Any) -> str | None:
    return None if value is None or isinstance(value, dict) else "expected a table of keys"


def anything(value: Any) -> str | None:
    return None


TOP: dict[str, Checker] = {
    "compute_environment": exact("LOCAL_MACHINE", "AMAZON_SAGEMAKER"),
    "distributed_type": exact(*DISTRIBUTED_TYPES),
    "mixed_precision": exact(*MIXED_PRECISION),
    "use_cpu": strict_bool,
    "debug": strict_bool,
    "num_processes": processes,
    "machine_rank": integer(0),
    "num_machines": integer(1),
    "gpu_ids": anything,  # "all" or "0,1,2"
    "main_process_ip": text,
    "main_process_port": integer(1, 65535),
    "rdzv_backend": exact("static", "c10d", "etcd", "etcd-v2"),
    "same_network": strict_bool,
    "main_training_function": text,
    "enable_cpu_affinity": strict_bool,
    "fp8_config": table,
    "deepspeed_config": table,
    "fsdp_config": table,
    "parallelism_config": table,
    "megatron_lm_config": table,
    "mpirun_config": table,
    "downcast_bf16": anything,
    "tpu_name": anything,
    "tpu_zone": anything,
    "tpu_use_cluster": strict_bool,
    "tpu_use_sudo": strict_bool,
    "command_file": anything,
    "commands": anything,
    "tpu_vm": anything,
    "tpu_env": anything,
    "dynamo_config": table,
    "fp16": strict_bool,  # old spelling of mixed_precision: fp16
    "dynamo_backend": anything,  # old spelling of dynamo_config
}

FSDP: dict[str, Checker] = {
    "fsdp_version": exact("1", "2"),
    "fsdp_offload_params": flag,
    "fsdp_min_num_params": integer(0),
    "fsdp_sharding_strategy": choice(SHARDING_STRATEGY, numbered=True),
    "fsdp_reshard_after_forward": anything,  # a flag (FSDP2) or a strategy (FSDP1): see caller
    "fsdp_auto_wrap_policy": choice(AUTO_WRAP_POLICY),
    "fsdp_transformer_layer_cls_to_wrap": text,
    "fsdp_backward_prefetch": choice(BACKWARD_PREFETCH, numbered=True),
    "fsdp_state_dict_type": choice(STATE_DICT_TYPE, numbered=True),
    "fsdp_forward_prefetch": flag,
    "fsdp_use_orig_params": flag,
    "fsdp_cpu_ram_efficient_loading": flag,
    "fsdp_sync_module_states": flag,
    "fsdp_activation_checkpointing": flag,
    "fsdp_activation_checkpointing_offload": flag,
    "fsdp_ignored_modules": text,
}

DEEPSPEED: dict[str, Checker] = {
    "deepspeed_config_file": text,
    "zero_stage": integer(0, 3),
    "offload_optimizer_device": exact("none", "cpu", "nvme"),
    "offload_param_device": exact("none", "cpu", "nvme"),
    "offload_optimizer_nvme_path": text,
    "offload_param_nvme_path": text,
    "gradient_accumulation_steps": anything,  # compared with the recipe by the caller
    "gradient_clipping": anything,
    "zero3_init_flag": flag,
    "zero3_save_16bit_model": flag,
    "deepspeed_hostfile": text,
    "deepspeed_exclusion_filter": text,
    "deepspeed_inclusion_filter": text,
    "deepspeed_multinode_launcher": exact(
        "pdsh", "standard", "openmpi", "mvapich", "mpich", "slurm", "nossh"
    ),
    "deepspeed_moe_layer_cls_names": text,
}

# FSDP2 keys that accelerate reads only for FSDP1 (it warns, or ignores them)
FSDP1_ONLY = (
    "fsdp_sharding_strategy",
    "fsdp_backward_prefetch",
    "fsdp_forward_prefetch",
    "fsdp_use_orig_params",
    "fsdp_sync_module_states",
)
