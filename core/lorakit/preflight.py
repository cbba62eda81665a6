"""The memory pre-flight: gather a recipe's plan inputs (config only), render it, judge the fit.

Nothing is downloaded or loaded: the model source's ``model_config()`` reads ``config.json`` (or
GGUF metadata), the quant and PEFT plugins describe themselves through ``memory_spec()``, and the
data is read the way ``lorakit check`` reads it (torch-free) when the model's tokenizer is local.
Used by ``lorakit plan`` and at the start of ``lorakit run`` (:func:`check_memory`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from lorakit.components import Components
from lorakit.console import say
from lorakit.contracts import DescribesMemory, ReadsModelConfig
from lorakit.device import available_memory
from lorakit.errors import LorakitError, ModelError, RecipeError, RunError
from lorakit.memory_plan import (
    Plan,
    PlanInputs,
    gb,
    make_plan,
    parse_size,
    quantized_bytes,
    shape_from_config,
    weight_bytes,
)
from lorakit.recipe import Recipe

# set by `lorakit run --nproc` for the processes it starts: the plan was checked once already
PREFLIGHT_DONE = "LORAKIT_MEMORY_PLAN_CHECKED"


def model_config(source: Any, name: str) -> dict[str, Any]:
    """The config.json of the model ``source`` (plugin ``name``), read without loading it."""
    if not isinstance(source, ReadsModelConfig):
        raise ModelError(
            f"model plugin {name!r} cannot give its config without loading the model",
            where="[model]",
            fix="add a model_config() method to the plugin (see contracts.ReadsModelConfig)",
        )
    config = source.model_config()
    if not isinstance(config, dict):
        raise ModelError(f"model plugin {name!r}: model_config() returned {config!r}")
    return config


def _spec(plugin: Any, section: str, name: str) -> dict[str, Any]:
    if not isinstance(plugin, DescribesMemory):
        raise ModelError(
            f"[{section}] plugin {name!r} does not describe its memory (no memory_spec())",
            where=f"[{section}]",
            fix="lorakit plan cannot predict this recipe; run it and read peak_memory_gb",
        )
    return dict(plugin.memory_spec())


def detect_device(recipe: Recipe) -> tuple[str, str, int | None]:
    """(device, description, usable bytes or None) without importing torch."""
    wanted = recipe.train.device
    if wanted in ("auto", "cuda") and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            name, mib = out.splitlines()[0].rsplit(",", 1)
            return "cuda", f"{name.strip()} (nvidia-smi)", int(float(mib)) * 2**20
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    if wanted == "cuda":
        return "cuda", "CUDA (size unknown)", None
    available = available_memory()
    if available is not None:
        return "cpu", "CPU RAM available now", available
    return "cpu", "CPU RAM (size unknown)", None


def capacity(recipe: Recipe, device_memory: str | None) -> tuple[str, str, int | None]:
    """(device, description, bytes) from ``--device-memory`` (e.g. "24GB") or the detected
    device."""
    device, where, size = detect_device(recipe)
    if device_memory:
        try:
            size = parse_size(device_memory)
        except ValueError as exc:
            raise RecipeError([f"--device-memory: {exc}"]) from None
        where = "--device-memory"
    return device, where, size


def _auto_dtype(device: str) -> str:
    """What ``auto`` resolves to, without timing or torch: bf16 on CUDA, on CPU what the
    cached measurement of ``lorakit.device`` said (fp32 when nothing was measured)."""
    if device == "cuda":
        return "bf16"
    from lorakit.device import BF16_FLAGS, cached_bf16_choice, cpu_flags

    if not any(f in cpu_flags() for f in BF16_FLAGS):
        return "fp32"
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        return "fp32"
    return "bf16" if cached_bf16_choice(torch_version) else "fp32"


# the objectives whose micro-batch rows hold both sides of each pair
PAIR_OBJECTIVES = ("dpo", "orpo", "simpo")


def data_tokens(
    recipe: Recipe, components: Components, merge: int = 0
) -> tuple[int, int, str, bool]:
    """Tokens and supervised positions of the largest micro-batch, where they came from, and
    whether merging made it larger.

    With the model's tokenizer on disk the data is read and tokenized (torch-free); otherwise the
    upper bound: ``batch x max_length`` tokens, all supervised, twice that for a pair objective
    (DPO, ORPO, SimPO: a micro-batch holds both sides of its pairs, each up to ``max_length``;
    read from the data, a pair is both sides whole, as a GPU packs them). ``merge``: the
    micro-batches of a step are merged up to that many tokens
    (:func:`lorakit.packing.merge_budget`), so the largest is also up to that many tokens of the
    step's longest examples.
    """
    t = recipe.train
    pairs = t.objective in PAIR_OBJECTIVES
    budget = (2 if pairs else 1) * t.per_device_train_batch_size * t.max_length
    try:
        from lorakit.data.lite_tokenizer import LiteTokenizer, find_tokenizer_folder
        from lorakit.data.pipeline import DataReport, load_splits

        folder, note = find_tokenizer_folder(components.model_source, recipe.model.name)
        if folder is None:
            return budget, budget, f"upper bound, no data read ({note})", False
        splits = load_splits(components.sources, recipe.data, recipe.recipe_dir, DataReport())
        read = _pair_lengths if pairs else _example_lengths
        lengths, share = read(recipe, components, splits.train, LiteTokenizer(folder))
    except Exception as exc:  # the plan must never block on the data: fall back to the bound
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return budget, budget, f"upper bound, data not read: {first}", False
    if pairs and not lengths:
        return budget, budget, "upper bound, no pair in the data", False
    what = "pairs, both sides; " if pairs else ""
    return _largest_micro_batch(t, lengths, share, merge, budget, what)


def _example_lengths(
    recipe: Recipe, components: Components, train: Any, tokenizer: Any
) -> tuple[list[int], float]:
    """Each training example's tokens (up to ``max_length``) and the supervised share."""
    from lorakit.data.lint import lint

    t = recipe.train
    stats = lint(train, components.formatter, tokenizer, t.max_length, recipe.data.overlength)
    share = stats.supervised_tokens / max(1, stats.total_tokens)
    return [min(n, t.max_length) for n in stats.lengths], share


def _pair_lengths(
    recipe: Recipe, components: Components, train: Any, tokenizer: Any
) -> tuple[list[int], float]:
    """Each training pair's tokens, both sides whole, and the supervised share."""
    from lorakit.data.pairs import tokenize_pairs
    from lorakit.data.pipeline import DataReport

    # the plan counts what trains; `check` and `run` report the drops
    rows = tokenize_pairs(
        train, components.formatter, tokenizer, recipe.train.max_length, "drop", DataReport()
    )
    lengths = [r.length for r in rows]
    supervised = sum(r.chosen.n_supervised + r.rejected.n_supervised for r in rows)
    return lengths, supervised / max(1, sum(lengths))


def _largest_micro_batch(
    t: Any, lengths: list[int], share: float, merge: int, budget: int, what: str
) -> tuple[int, int, str, bool]:
    """:func:`data_tokens`' answer from the rows' ``lengths`` and supervised ``share``."""
    lengths = sorted(lengths, reverse=True)
    tokens = budget if t.packing else sum(lengths[: t.per_device_train_batch_size])
    tokens = max(1, min(tokens, budget))
    apart = tokens
    if merge:  # the step's micro-batches merged up to ``merge`` tokens
        step = t.per_device_train_batch_size * t.gradient_accumulation_steps
        tokens = max(tokens, min(merge, sum(lengths[:step]), budget))
    note = f"from the data: {what}{share:.0%} of tokens supervised"
    if merge:
        note += f"; a step's micro-batches merged up to {merge} tokens (train.merge_micro_batches)"
    return tokens, round(tokens * share), note, tokens > apart


def plan_recipe(
    recipe: Recipe,
    components: Components,
    device: str,
    read_data: bool = True,
    merge: int | None = None,
) -> Any:
    """The :class:`Plan` for ``recipe`` (its built ``components``) on ``device`` and a note on
    the micro-batch size. ``merge``: the tokens a step's micro-batches merge up to (a resumed
    run's, from its run.json); None: what a run started now would merge."""
    shape = shape_from_config(model_config(components.model_source, recipe.model.name))
    quant = _spec(components.quant, "quant", recipe.quant.name)
    peft = _spec(components.peft, "peft", recipe.peft.name)
    if recipe.train.from_adapter is not None:  # its own LoRA shape trains; [peft] is not used
        peft.update(start_adapter_shape(recipe))
    dtype = quant.get("dtype", "auto")
    if dtype == "auto":
        dtype = _auto_dtype(device)
    if read_data:
        from lorakit.distributed import world_size
        from lorakit.packing import merge_budget

        if merge is None:
            merge = merge_budget(recipe.train, device, world_size())  # `lorakit plan`: 1
        tokens, supervised, note, raised = data_tokens(recipe, components, merge)
        merge = merge if raised else 0  # a fix only where merging sets the micro-batch
    else:
        merge = 0  # the upper bound already holds any merged row
        sides = 2 if recipe.train.objective in PAIR_OBJECTIVES else 1
        tokens = sides * recipe.train.per_device_train_batch_size * recipe.train.max_length
        supervised, note = tokens, "upper bound"
    targets = peft["targets"]
    inputs = PlanInputs(
        shape=shape,
        r=int(peft["r"]),
        targets=targets if isinstance(targets, str) else tuple(targets),
        dora=bool(peft.get("dora", False)),
        scheme=quant["weights"],
        double_quant=bool(quant.get("double_quant", False)),
        dtype=dtype,
        optim=recipe.train.optim,
        checkpointing=recipe.train.gradient_checkpointing,
        tokens=tokens,
        supervised=supervised,
        eval_batch=recipe.eval.batch_size,
        eval_length=recipe.train.max_length + recipe.eval.max_new_tokens,
        cpu=device == "cpu",
        merged=merge,
    )
    return make_plan(inputs), note


def start_adapter_shape(recipe: Recipe) -> dict[str, Any]:
    """What decides the size of the adapter a ``train.from_adapter`` run trains, from that
    adapter's ``adapter_config.json`` (the run loads it with its own settings, not [peft]'s):
    ``r``, ``alpha``, ``targets`` and ``dora``, as the PEFT plugins' ``memory_spec`` names them.
    Read as JSON: no torch."""
    from lorakit.modeling import from_adapter_folder
    from lorakit.rundir import read_json

    folder = from_adapter_folder(recipe)  # one with adapter_config.json, or a RunError
    assert folder is not None
    config_file = folder / "adapter_config.json"
    config = read_json(config_file)
    r, targets = config.get("r"), config.get("target_modules")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise RunError(
            f"{config_file}: r is {r!r}, not a LoRA rank",
            where="train.from_adapter",
            fix="copy the adapter again from the run that trained it",
        )
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        targets = tuple(sorted(targets))
    elif not isinstance(targets, str):
        raise RunError(
            f"{config_file}: target_modules is {targets!r}, not module names",
            where="train.from_adapter",
            fix="copy the adapter again from the run that trained it",
        )
    return {
        "r": r,
        "alpha": config.get("lora_alpha", r),
        "targets": targets,
        "dora": bool(config.get("use_dora", False)),
    }


# The rows of `lorakit plan`'s base-weights table: (scheme, double quant, label).
SCHEMES = (
    ("nf4", True, "NF4 + double quant"),
    ("nf4", False, "NF4"),
    ("fp4", True, "FP4 + double quant"),
    ("fp4", False, "FP4"),
    ("int8", False, "8-bit"),
    ("bf16", False, "bf16/fp16"),
    ("fp32", False, "fp32"),
)


def weights_by_scheme(plan: Plan) -> list[tuple[str, int, bool]]:
    """The base's linear-layer weights under each scheme: (label, bytes, the recipe's)."""
    i, s = plan.inputs, plan.inputs.shape
    rows = []
    for scheme, dq, label in SCHEMES:
        if scheme in ("bf16", "fp32"):
            n = quantized_bytes(s.total_params(), 0, scheme)
        else:
            n = weight_bytes(s, scheme, dq, i.dtype)
        unquantized = i.scheme == "none" and scheme == ("fp32" if i.dtype == "fp32" else "bf16")
        rows.append((label, n, (scheme, dq) == (i.scheme, i.double_quant) or unquantized))
    return rows


def memory_terms(plan: Plan) -> list[tuple[str, int, str]]:
    """The plan's memory terms: (name, bytes, what it counts)."""
    i = plan.inputs
    other = "adamw_torch 8 B, adamw_8bit 2 B, sgd 0 B per trainable parameter"
    opt_note = "" if plan.optimizer_known else " (unknown optimizer: counted as AdamW)"
    on, off = (
        (plan.activations, plan.activations_other)
        if i.checkpointing
        else (plan.activations_other, plan.activations)
    )
    rows = [
        ("base weights", plan.weights, f"{i.scheme}{' + double quant' if i.double_quant else ''}"),
        ("LoRA weights", plan.lora, "fp32"),
        ("gradients", plan.grads, "fp32, LoRA only"),
        ("optimizer state", plan.optimizer, f"{i.optim}{opt_note}; {other}"),
        (
            "activations",
            plan.activations,
            f"checkpointing {'on' if i.checkpointing else 'off'}; on: {gb(on)}, off: {gb(off)}",
        ),
        ("logits", plan.logits, "supervised positions only"),
        ("eval KV cache", plan.kv_cache, f"batch {i.eval_batch} x {i.eval_length} tokens"),
    ]
    if plan.dequant:
        rows.append(("dequant scratch", plan.dequant, "largest linear weight, one at a time"))
    if plan.runtime:
        rows.append(("runtime", plan.runtime, "Python + torch + libraries (CPU peak RSS)"))
    return rows


def summary(plan: Plan, capacity: int | None, where: str) -> str:
    fit = ""
    if capacity is not None:
        fit = (
            f" of {gb(capacity)} ({where}): fits"
            if plan.peak <= capacity
            else f" of {gb(capacity)} ({where}): does NOT fit"
        )
    return (
        f"memory plan: peak {gb(plan.peak)}{fit}; {plan.trainable:,} trainable of "
        f"{plan.total:,} parameters"
    )


def fixes(plan: Plan, resuming: bool = False) -> str:
    """What would make ``plan`` fit, for the fix of an error. A resume refuses every change to
    what is trained (:data:`lorakit.rundir.RESUME_SAFE`), so for one only a smaller eval batch
    is offered to the run as it is; the rest is for a new run."""
    out = _changes(plan)
    if not resuming:
        return "; ".join(out)
    parts = [f"{f} (a resume accepts [eval] changes)" for f in out if "[eval]" in f]
    others = [f for f in out if "[eval]" not in f]
    if others:
        parts.append(
            f"start a new run in another output.dir with {'; '.join(others)} (a resume keeps "
            "the settings the run started with)"
        )
    return "; or ".join(parts)


def _changes(plan: Plan) -> list[str]:
    i = plan.inputs
    out = []
    if i.merged:
        out.append(
            f"train.merge_micro_batches = false (a step's micro-batches now merge up to "
            f"{i.merged} tokens)"
        )
    if i.tokens > 1:
        out.append(
            "a smaller train.per_device_train_batch_size (raise gradient_accumulation_steps)"
        )
        out.append("a smaller train.max_length")
    if not i.checkpointing:
        out.append("train.gradient_checkpointing = true")
    if i.scheme not in ("nf4", "fp4"):
        out.append('[quant] plugin = "bnb-4bit" (QLoRA)')
    if plan.optimizer > plan.lora // 2:
        out.append('train.optim = "adamw_8bit" (GPU) or "sgd"')
    if plan.eval_peak > plan.train_peak:
        out.append("a smaller [eval].batch_size")
    return out


def resumed_merge(recipe: Recipe) -> int | None:
    """The tokens up to which a resumed run of ``recipe`` merges a step's micro-batches, as its
    run.json recorded at the start (0: it does not merge); None where its folder has no
    readable run.json (the resume will say so itself)."""
    from lorakit.rundir import RunDir, read_json, recorded_merge

    path = RunDir(recipe.run_dir).run_json
    try:
        return recorded_merge(read_json(path)) if path.is_file() else None
    except LorakitError:
        return None


def check_memory(
    recipe: Recipe,
    components: Components,
    *,
    device_memory: str | None,
    processes: int | None,
    ignore: bool,
    recipe_arg: str,
    resuming: bool = False,
) -> None:
    """At the start of ``lorakit run``: say the plan's one-line summary; refuse to start (a
    ``RunError``) when it predicts no fit, unless ``ignore``. ``processes``: ranks on this
    machine (``--nproc``; else ``LOCAL_WORLD_SIZE``); on CPU they share its memory.
    ``recipe_arg``: the recipe as the user named it, for the fix. ``resuming``: the run
    continues from a checkpoint, so it merges micro-batches as it started and its fixes are
    those a resume accepts."""
    device, where, size = capacity(recipe, device_memory)
    ranks = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device == "cpu" and size is not None and ranks > 1:
        size //= ranks  # processes on one machine share its memory
        where = f"{where} shared by {ranks} processes"
    try:
        # The upper bound (batch x max_length tokens, all supervised) needs no data; only when it
        # does not fit is the data read for the real micro-batch size.
        plan, _note = plan_recipe(recipe, components, device, read_data=False)
        if size is not None and plan.peak > size:
            merge = resumed_merge(recipe) if resuming else None
            plan, _note = plan_recipe(recipe, components, device, merge=merge)
    except (LorakitError, ValueError) as exc:
        say(f"memory plan skipped: {exc}")
        return
    say(summary(plan, size, where))
    if size is not None and plan.peak > size and not ignore:
        advice = fixes(plan, resuming)
        lead = f"{'' if resuming else 'try '}{advice}; " if advice else ""
        raise RunError(
            f"the memory plan predicts a peak of {gb(plan.peak)} (training {gb(plan.train_peak)},"
            f" generation {gb(plan.eval_peak)}) but {where} offers {gb(size)}",
            fix=f"{lead}see `lorakit plan {recipe_arg}`, or pass --ignore-memory-plan to "
            f"{'resume' if resuming else 'start'} anyway",
        )
