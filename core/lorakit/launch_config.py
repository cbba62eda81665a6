"""``lorakit check RECIPE --launch-config FILE``: an accelerate config, checked before a GPU job.

``accelerate launch`` reads its YAML (or JSON) config leniently: a misspelled key inside
``fsdp_config`` is copied onto its arguments and never read, an unquoted ``no`` is YAML's false,
and FSDP on a CPU quietly becomes DDP. This module reads the file itself (no accelerate, no
torch: the known keys and values are in :mod:`lorakit.accelerate_keys`) and reports every
problem at once, each with file:line, what is wrong and the fix; with a recipe it also checks
what matters for LoRA/QLoRA under FSDP and DeepSpeed. Things it cannot know here (the GPUs of
the machine the job will run on) are printed as notes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lorakit import accelerate_keys as keys
from lorakit.errors import LorakitError, closest
from lorakit.launch_recipe import check_against_recipe, check_gpu_engine
from lorakit.safe_yaml import YamlRefused, refuse_unsafe_yaml

SUFFIXES = (".yaml", ".yml", ".json")
GPU_ONLY = {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}


class LaunchConfigError(LorakitError):
    """Problems in an accelerate launch config; ``problems`` holds every one."""

    def __init__(self, problems: list[str], *, source: str):
        self.problems = problems
        count = len(problems)
        head = f"{source}: {count} problem{'s' if count != 1 else ''} in launch config"
        super().__init__(head + "\n" + "\n".join(f"  {p}" for p in problems))

    def __str__(self) -> str:
        return self.message


class _Report:
    def __init__(self, path: Path, lines: dict[str, int]):
        self.path, self.lines = path, lines
        self.problems: list[str] = []
        self.notes: list[str] = []

    def where(self, key: str) -> str:
        # the key's own line, else its table's line, else the file
        for k in (key, key.rsplit(".", 1)[0]):
            if k in self.lines:
                return f"{self.path}:{self.lines[k]}: {key}"
        return f"{self.path}: {key}"

    def problem(self, key: str, what: str, fix: str | None = None) -> None:
        self.problems.append(f"{self.where(key)}: {what}" + (f"\n    fix: {fix}" if fix else ""))

    def note(self, what: str) -> None:
        self.notes.append(what)


def is_launch_config(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


MAX_DEPTH = 32  # accelerate configs nest two levels (fsdp_config: ...)


def _refuse_unsafe(path: Path, text: str) -> None:
    """No alias and no nesting deeper than an accelerate config needs (``safe_yaml.py``;
    JSON is YAML), before anything is built. A key given twice is reported by :func:`_lines`
    with its dotted name."""
    try:
        refuse_unsafe_yaml(text, MAX_DEPTH, yaml.SafeLoader, repeated_keys=False)
    except YamlRefused as exc:
        raise LaunchConfigError(
            [f"{path}:{exc.line + 1}: {exc.problem}\n    fix: {exc.fix}"], source=str(path)
        ) from None


def read(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The config as accelerate reads it, and the line of every key (``fsdp_config.x``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LorakitError(
            f"cannot read the launch config: {exc}",
            where=str(path),
            fix="give an accelerate "
            "config file (accelerate config writes one; configs/ has an FSDP example)",
        ) from None
    try:
        _refuse_unsafe(path, text)
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        lines = _lines(yaml.compose(text, Loader=yaml.SafeLoader))
    except json.JSONDecodeError as exc:
        raise LaunchConfigError(
            [f"{path}:{exc.lineno}: not valid JSON: {exc.msg}\n    fix: correct that line"],
            source=str(path),
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        what = getattr(exc, "problem", None) or str(exc)
        raise LaunchConfigError(
            [
                f"{at}: not valid YAML: {what}\n    fix: correct that line (indentation, a "
                "missing ':' or an unclosed quote)"
            ],
            source=str(path),
        ) from None
    if not isinstance(data, dict):
        raise LaunchConfigError(
            [
                f"{path}: expected a table of keys (distributed_type: ..., num_processes: ...), "
                + ("the file is empty" if data is None else f"got {type(data).__name__}")
            ],
            source=str(path),
        )
    return data, lines


def _lines(node: Any, prefix: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = f"{prefix}{key.value}"
            if name in out:
                out["!duplicate " + name] = key.start_mark.line + 1
            out[name] = key.start_mark.line + 1
            if not prefix:
                out.update(_lines(value, name + "."))
    return out


def check_launch_config(
    path: str | Path, recipe: Any = None, components: Any = None
) -> tuple[str, list[str]]:
    """Check ``path`` (and, with a recipe, the pair); return a summary line and notes.

    Raises :class:`LaunchConfigError` listing every problem.
    """
    path = Path(path)
    data, lines = read(path)
    report = _Report(path, lines)
    for name in lines:
        if name.startswith("!duplicate "):
            key = name.split(" ", 1)[1]
            report.problems.append(
                f"{path}:{lines[name]}: {key}: given twice (YAML keeps the last one silently)"
                "\n    fix: keep one"
            )
    if data.get("compute_environment", "LOCAL_MACHINE") == "AMAZON_SAGEMAKER":
        report.note("an AMAZON_SAGEMAKER config: only its YAML was checked")
        return f"launch config {path}: ok (SageMaker, not checked further)", report.notes
    _check_table(report, data, keys.TOP, "")
    fsdp = _prefixed(data.get("fsdp_config"), "fsdp_")
    deepspeed = (
        data.get("deepspeed_config") if isinstance(data.get("deepspeed_config"), dict) else {}
    )
    _check_table(report, fsdp, keys.FSDP, "fsdp_config.")
    _check_table(report, deepspeed or {}, keys.DEEPSPEED, "deepspeed_config.")
    engine = str(data.get("distributed_type", ""))
    if "distributed_type" not in data:
        report.problem(
            "distributed_type",
            "missing (accelerate refuses a config without it)",
            "add distributed_type: FSDP (or MULTI_GPU for DDP, DEEPSPEED, NO)",
        )
    _check_processes(report, data)
    if engine == "FSDP":
        _check_fsdp(report, fsdp)
    elif fsdp:
        report.note(f"fsdp_config is not used: distributed_type is {engine or 'missing'}")
    if engine != "DEEPSPEED" and deepspeed:
        report.note(f"deepspeed_config is not used: distributed_type is {engine or 'missing'}")
    if engine in GPU_ONLY:
        check_gpu_engine(report, data, GPU_ONLY[engine], recipe)
    if recipe is not None:
        check_against_recipe(report, data, fsdp, deepspeed or {}, recipe, components)
    if report.problems:
        raise LaunchConfigError(report.problems, source=str(path))
    return f"launch config {path}: ok ({_summary(data, fsdp)})", report.notes


def _prefixed(table: Any, prefix: str) -> dict[str, Any]:
    """``fsdp_config`` as accelerate's launch reads it: ``version`` means ``fsdp_version``."""
    if not isinstance(table, dict):
        return {}
    return {(k if str(k).startswith(prefix) else prefix + str(k)): v for k, v in table.items()}


def _check_table(report: _Report, table: dict[str, Any], known: dict, prefix: str) -> None:
    for key, value in table.items():
        check = known.get(key)
        if check is None:
            hint = closest(str(key), known)
            effect = "accelerate refuses it" if not prefix else "accelerate would ignore it"
            report.problem(
                f"{prefix}{key}",
                "unknown key" + (f", did you mean {hint}?" if hint else "") + f" ({effect})",
                f"use {hint}" if hint else "remove it; see accelerate launch --help for the keys",
            )
        elif key == "mixed_precision" and value is False:
            report.problem(key, "YAML reads an unquoted no as false", "write mixed_precision: 'no'")
        elif (what := check(value)) is not None:
            report.problem(f"{prefix}{key}", f"{what}, got {value!r}")


def _check_processes(report: _Report, data: dict[str, Any]) -> None:
    machines, rank = data.get("num_machines", 1), data.get("machine_rank", 0)
    if isinstance(machines, int) and isinstance(rank, int) and machines >= 1 and rank >= machines:
        report.problem(
            "machine_rank",
            f"{rank} is not below num_machines ({machines})",
            f"give each machine a rank from 0 to {machines - 1}",
        )
    if data.get("num_processes", -1) == -1 and data.get("distributed_type", "NO") != "NO":
        report.note("num_processes is not set: pass --num_processes N to accelerate launch")
    if isinstance(machines, int) and machines > 1 and not data.get("main_process_ip"):
        report.note(
            f"num_machines is {machines} but main_process_ip is not set: pass --main_process_ip "
            "and --main_process_port (machine 0's address) to accelerate launch on every machine"
        )


def _check_fsdp(report: _Report, fsdp: dict[str, Any]) -> None:
    version = str(fsdp.get("fsdp_version", "1"))
    key = "fsdp_config.fsdp_reshard_after_forward"
    if "fsdp_reshard_after_forward" in fsdp:
        value = fsdp["fsdp_reshard_after_forward"]
        if version == "2" and keys.flag(value):
            report.problem(
                key,
                f"FSDP2 takes true or false, got {value!r}",
                "true: full sharding (least memory), false: like SHARD_GRAD_OP",
            )
        if version == "1" and (what := keys.choice(keys.SHARDING_STRATEGY, numbered=True)(value)):
            report.problem(key, f"FSDP1 takes a sharding strategy: {what}, got {value!r}")
    state = str(fsdp.get("fsdp_state_dict_type", "")).upper()
    if version == "2" and state in ("LOCAL_STATE_DICT", "2"):
        report.problem(
            "fsdp_config.fsdp_state_dict_type",
            "FSDP2 has no LOCAL_STATE_DICT",
            "use FULL_STATE_DICT",
        )
    offload = keys.truth(fsdp.get("fsdp_activation_checkpointing_offload", False))
    if offload and not keys.truth(fsdp.get("fsdp_activation_checkpointing", False)):
        report.problem(
            "fsdp_config.fsdp_activation_checkpointing_offload",
            "needs fsdp_activation_checkpointing: true (accelerate refuses it alone)",
        )
    if offload and version != "2":
        report.problem(
            "fsdp_config.fsdp_activation_checkpointing_offload",
            "needs fsdp_version: 2 (accelerate refuses it with FSDP1)",
        )
    efficient = keys.truth(fsdp.get("fsdp_cpu_ram_efficient_loading", True))
    if efficient and keys.truth(fsdp.get("fsdp_sync_module_states", True)) is False:
        report.problem(
            "fsdp_config.fsdp_sync_module_states",
            "false while fsdp_cpu_ram_efficient_loading is true (its default): accelerate launch "
            "refuses the pair",
            "set fsdp_sync_module_states: true, or fsdp_cpu_ram_efficient_loading: false",
        )
    if version == "2":
        for name in keys.FSDP1_ONLY:
            if name in fsdp:
                report.note(f"fsdp_config.{name} has no effect with fsdp_version 2")


def _summary(data: dict[str, Any], fsdp: dict[str, Any]) -> str:
    engine = str(data.get("distributed_type", "?"))
    if engine == "FSDP":
        engine += str(fsdp.get("fsdp_version", "1"))
    procs = data.get("num_processes", -1)
    procs_text = "--num_processes" if procs == -1 else str(procs)
    return (
        f"{engine}, {procs_text} processes on {data.get('num_machines', 1)} machine(s), "
        f"mixed_precision {data.get('mixed_precision', 'no')}"
    )
