"""Run a recipe, phase by phase.

:func:`_run` is the whole run in a dozen lines: each phase is a function that takes what the
earlier ones returned and returns its own object (the data, the model, the trainer, the
adapter, the evaluation), in the order they run. Read this file top to bottom.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from lorakit import __version__, distributed
from lorakit.components import Components
from lorakit.console import note_other_version, say
from lorakit.contracts import HasSystemPrompt, ModelRef
from lorakit.data.pairs import tokenize_pairs
from lorakit.data.pipeline import (
    DataReport,
    Splits,
    load_splits,
    require_training_examples,
    supervised_share,
    tokenize_examples,
    write_splits,
)
from lorakit.data.row_files import row_lengths
from lorakit.data.special_text import check_special_text
from lorakit.data.unpaired import tokenize_answers, weight_note
from lorakit.diskfull import disk_full_is_an_error
from lorakit.distributed import fsdp_launch, is_main, world_size
from lorakit.errors import DataError, RunError
from lorakit.evaluation.harness import check_tasks
from lorakit.export.adapter_io import save_adapter, stop_token_ids
from lorakit.fidelity import (
    TRAIN_SERVE_FIX,
    train_serve_problems,
    training_system_prompt,
    with_default_system,
)
from lorakit.recipe import Recipe
from lorakit.rundir import RunDir, read_json, recorded_merge, write_json
from lorakit.secrets import credentials_warning, masked_keys
from lorakit.tracking import Loggers, log_outputs, run_info


def run_recipe(recipe: Recipe, components: Components, resume: str | None = None) -> Path:
    """Train an adapter for ``recipe`` with its plugins, built once (``build_components``);
    return the run folder."""
    loggers = Loggers(say)  # opened once the run folder is claimed, on rank 0
    try:
        path = _run(recipe, components, resume, loggers)
    except KeyboardInterrupt:
        loggers.close("KILLED", timeout=5.0)  # Ctrl-C must not wait on a slow tracker
        raise
    except BaseException:
        loggers.close("FAILED")
        raise
    loggers.close("FINISHED")
    return path


def _run(recipe: Recipe, components: Components, resume: str | None, loggers: Loggers) -> Path:
    """The run, phase by phase; each phase returns what the next ones use."""
    import transformers

    from lorakit.device import malloc_mode
    from lorakit.modeling import start_adapter_dir

    transformers.logging.set_verbosity_error()
    run = RunDir(recipe.run_dir)
    device = join_processes(recipe)
    start = find_start(run, recipe, resume)
    check_tasks(recipe)  # an unknown lm-eval task stops the run now, not after training
    malloc_mode()  # so does a misspelt LORAKIT_MALLOC, before the run folder is claimed
    data = prepare_data(recipe, components, run, start, device)
    compute_dtype = components.quant.compute_dtype(device)  # what `auto` picks on this machine
    reference = resolve_reference(recipe, compute_dtype, start)
    start_adapter_dir(recipe, data.ref)  # so are train.from_adapter's files
    claim_run(run, recipe, components, data, start, loggers, reference, compute_dtype)
    transformers.set_seed(recipe.train.seed)  # LoRA init, dropout and data order draw from it
    base = load_for_training(
        recipe, components, data, device, compute_dtype=compute_dtype, reference=reference
    )
    trainer = train(recipe, base, data, run, loggers, start)
    adapter = save_trained_adapter(recipe, trainer, base, data, run)
    if adapter is None:  # another rank: rank 0 evaluates and reports
        return run.path
    report = evaluate_trained(recipe, components, run, data, release_trainer(trainer), loggers)
    log_outputs(loggers, run, report, adapter.global_step)
    return run.path


@attrs.frozen
class Start:
    """Where the run starts: a checkpoint to resume (and the settings the resume changes), or
    nothing (a new run)."""

    checkpoint: Path | None = None
    changed: dict[str, Any] = attrs.field(factory=dict)
    # a resumed run's reference mode, as its run.json recorded it (None: not recorded, a run
    # without a reference or one started before lorakit recorded it)
    reference: str | None = None
    # the compute dtype a resumed run started with (run.json; None for older runs)
    compute_dtype: str | None = None
    # the tokens up to which a resumed run merged its micro-batches (run.json's batch; 0: it
    # did not, or it started before lorakit merged them)
    merge_tokens: int = 0
    # whether a resumed run's rows shared their examples' common prefix (run.json's batch;
    # False: they did not, or it started before lorakit shared them)
    share_prefix: bool = False


@attrs.frozen
class RunData:
    """The run's data, split, formatted and tokenized, with the tokenizer it was made with."""

    splits: Splits
    report: DataReport
    ref: ModelRef
    tokenizer: Any
    end_of_turn: str
    # SFT: Tokenized rows in memory-mapped files (data/row_files.py); a preference
    # objective: a list of PairRows (KTO: of AnswerRows)
    train_rows: Sequence[Any]
    val_rows: Sequence[Any]
    batch: dict[str, Any]  # distributed.batch_plan
    system_prompt: str | None = None  # the one every training conversation had (fidelity.py)


@attrs.frozen
class TrainingModel:
    """The base model, prepared for training, with a freshly initialised adapter."""

    model: Any
    device: str
    compute_dtype: Any
    quantized_residual: bool = False  # QPiSSA/QOLoRA/multi-pass LoftQ (qpissa.py)
    reference: str | None = None  # "every_step" / "once" (resolve_reference); None: no reference


@attrs.frozen
class SavedAdapter:
    path: Path
    global_step: int


def join_processes(recipe: Recipe) -> str:
    """Phase 0: the device, and the other ranks when torchrun/accelerate started several
    processes (gloo on CPU, nccl on CUDA). Rank 0 alone reads and writes the run folder and
    decides; the others receive its decisions, and an error there stops them all
    (:func:`lorakit.distributed.on_main`)."""
    from lorakit.device import resolve_device

    device = resolve_device(recipe.train.device)
    distributed.check_engine(device)
    distributed.init(device)
    return device


def find_start(run: RunDir, recipe: Recipe, resume: str | None) -> Start:
    """Phase 1: the checkpoint to resume from, read only: nothing is written before the data
    and the tokenizer are known to be good, so a failed start never blocks the run name."""
    if not resume:
        return Start()
    checkpoint, changed, recorded = distributed.on_main(
        lambda: _find_checkpoint(run, resume, recipe)
    )
    return Start(checkpoint, changed, **recorded)


def prepare_data(
    recipe: Recipe, components: Components, run: RunDir, start: Start, device: str | None = None
) -> RunData:
    """Phase 2: read the data and split it deterministically (every rank: it is cheap and
    identical), load the tokenizer, format and tokenize with completion-only labels. The batch
    plan merges micro-batches as :func:`lorakit.packing.merge_budget` decides for ``device``
    (None: the recipe's), or, in a resumed run, as the run started."""
    from lorakit.modeling import load_tokenizer, resolve_model

    t = recipe.train
    report = DataReport()
    splits = load_splits(components.sources, recipe.data, recipe.recipe_dir, report)
    require_training_examples(splits, recipe.data)
    if start.checkpoint is not None:
        distributed.on_main(lambda: _same_data(run, splits.fingerprint))
    ref = resolve_model(components.model_source, recipe.model.name)
    tokenizer = load_tokenizer(ref, recipe_dir=recipe.recipe_dir)
    formatter = components.formatter
    overlength = recipe.data.overlength
    # SFT: one row per example; a preference objective: one pair of rows (chosen, rejected);
    # KTO: one row per labelled answer
    tokenize: Any = {"sft": tokenize_examples, "kto": tokenize_answers}.get(
        t.objective, tokenize_pairs
    )
    train_rows = tokenize(splits.train, formatter, tokenizer, t.max_length, overlength, report)
    val_report = DataReport()
    val_rows = tokenize(splits.val, formatter, tokenizer, t.max_length, overlength, val_report)
    # the validation split's drops, printed and saved with the training split's
    for reason, n in val_report.dropped.items():
        report.dropped[f"{reason} (val split)"] += n
    if val_report.truncated:
        report.warnings.append(f"truncated {val_report.truncated} val examples to train.max_length")
    special = val_report.special_text_warning()
    if special:
        report.warnings.append(f"val split: {special}")
    for name in [n for n in dict.fromkeys(recipe.eval.splits) if n not in ("train", "val")]:
        # the other splits the run scores, checked before training rather than after it
        split_report = DataReport()
        it = iter(splits.get(name))
        while chunk := list(itertools.islice(it, 1024)):
            check_special_text(chunk, tokenizer, split_report)
        special = split_report.special_text_warning()
        if special:
            report.warnings.append(f"{name} split: {special}")
    if not train_rows:
        raise DataError(
            "no training example is left after formatting", fix="see data_report.json for why"
        )
    if t.eval_steps and not val_rows:  # accepted, but the Trainer would evaluate nothing
        say(
            f"warning: train.eval_steps = {t.eval_steps} does nothing: the val split is empty, so "
            "no eval loss is logged during training; fix: give the data a val split "
            '(data.val_fraction, or records with "split": "val"), or leave train.eval_steps unset'
        )
    if t.objective == "kto":  # unbalanced answers want weights (TRL warns alike)
        good = sum(r.desirable for r in train_rows)
        note = weight_note(good, len(train_rows) - good, t.desirable_weight, t.undesirable_weight)
        if note:
            say(f"note: {note}")
    # trained the way it is served: the inference prompt is a prefix of the training text
    problems = train_serve_problems(formatter, tokenizer, splits.train)
    for problem in problems[:3]:
        say(f"warning: train/serve mismatch: {problem}")
    if problems:
        say(f"  ({len(problems)} in all; fix: {TRAIN_SERVE_FIX})")
    default = formatter.system_prompt if isinstance(formatter, HasSystemPrompt) else None
    # train and val: what the run renders (an eval example without it must render alike from
    # the saved adapter's template)
    system, note = training_system_prompt(itertools.chain(splits.train, splits.val), default)
    if note:
        say(f"note: {note}")
    return RunData(
        splits=splits,
        report=report,
        ref=ref,
        tokenizer=tokenizer,
        end_of_turn=formatter.end_of_turn(tokenizer),
        train_rows=train_rows,
        val_rows=val_rows,
        batch=distributed.batch_plan(
            t,
            world_size(),
            row_lengths(train_rows),
            merge_tokens(recipe, start, device),
            share_prefix(recipe, start, device),
        ),
        system_prompt=system,
    )


def merge_tokens(recipe: Recipe, start: Start, device: str | None) -> int:
    """Tokens up to which the micro-batches of a step are merged (0: not at all): what
    :func:`lorakit.packing.merge_budget` gives here, except that a resumed run keeps what it
    started with, so its resumed steps are those of an uninterrupted run (a run started before
    lorakit merged micro-batches keeps not merging them)."""
    from lorakit.device import resolve_device
    from lorakit.packing import merge_budget

    if start.checkpoint is not None:
        return start.merge_tokens
    return merge_budget(recipe.train, device or resolve_device(recipe.train.device), world_size())


def share_prefix(recipe: Recipe, start: Start, device: str | None) -> bool:
    """Whether packed rows share their examples' common prefix
    (:func:`lorakit.prefix_sharing.shares_row_prefix`), except that a resumed run keeps what it
    started with (one started before lorakit shared prefixes keeps packing examples whole),
    where it can: a run resumed on a GPU packs examples whole (its attention kernels know
    nothing of a shared prefix)."""
    from lorakit.device import resolve_device
    from lorakit.prefix_sharing import shares_row_prefix

    here = shares_row_prefix(recipe.train, device or resolve_device(recipe.train.device))
    if start.checkpoint is not None:
        return start.share_prefix and here
    return here


def claim_run(
    run: RunDir,
    recipe: Recipe,
    components: Components,
    data: RunData,
    start: Start,
    loggers: Loggers,
    reference: str | None,
    compute_dtype: Any,
) -> None:
    """Phase 3: claim the run folder atomically (or record the resume), then write the splits,
    the data report and open the loggers: rank 0 only; the other ranks wait for it and stop if
    it fails. run.json records the compute dtype (a new run's and each resume's) and a new
    run's ``reference`` (:func:`resolve_reference`)."""
    from lorakit.checkpoints import checkpoint_step
    from lorakit.device import dtype_name

    dtype = dtype_name(compute_dtype)

    def claim() -> None:
        if start.checkpoint is not None:
            run.record_resume(
                start.checkpoint,
                list(recipe.overrides),
                start.changed,
                batch=data.batch,
                compute_dtype=dtype,
            )
            done = checkpoint_step(start.checkpoint)
            aside = run.keep_metrics_until(done)  # its steps after the checkpoint run again
            if aside is not None:
                say(
                    f"metrics.jsonl continues from step {done}; the earlier attempt's whole "
                    f"log is kept as {aside.name}"
                )
            loggers.resumed = (done, run.logged_loss_sum(done))
            for key, (old, new) in start.changed.items():
                say(f"resume changes {key}: {old!r} -> {new!r}")
            if start.compute_dtype and start.compute_dtype != dtype:
                say(dtype_change_note(components, run, start.compute_dtype, dtype))
            say(f"resuming {run.path} from {start.checkpoint.name}")
        else:
            restarted = run.start(
                recipe.text,
                recipe.resolved(),
                list(recipe.overrides),
                recipe.config_hash(),
                recipe.path,
                batch=data.batch,
                reference_logps=reference,
                compute_dtype=dtype,
            )
            say(
                f"run folder {run.path}"
                + (" (started again: the earlier attempt left no checkpoint)" if restarted else "")
            )
        secret = masked_keys(recipe.settings())  # overrides included
        if secret:  # masked in what is written; say where such a secret belongs
            say(credentials_warning(secret))
        write_splits(run.splits, data.splits)
        write_json(
            run.data_report,
            {
                **data.report.to_json(),
                "fingerprint": data.splits.fingerprint,
                "counts": {
                    "train": len(data.train_rows),
                    "val": len(data.val_rows),
                    "test": len(data.splits.test),
                },
                "supervised_share": supervised_share(data.train_rows),
            },
        )
        # metrics.jsonl and the recipe's [log] plugins, each on a thread of its own
        loggers.open(
            dict(components.loggers),
            run_info(
                recipe,
                run,
                data.splits.fingerprint,
                resumed=start.checkpoint is not None,
                resumed_from=checkpoint_step(start.checkpoint) if start.checkpoint else None,
            ),
        )

    distributed.on_main(claim)
    for line in data.report.lines():
        say(line)
    n_test = len(data.splits.test)
    say(f"train {len(data.train_rows)} / val {len(data.val_rows)} / test {n_test} examples")
    say(distributed.describe(data.batch))


def load_for_training(
    recipe: Recipe,
    components: Components,
    data: RunData,
    device: str,
    *,
    compute_dtype: Any,
    reference: str | None,
) -> TrainingModel:
    """Phase 4: the base model, quantized by the recipe's backend (one replica per rank, on its
    LOCAL_RANK device), prepared for training (k-bit preparation, gradient checkpointing) and
    then given a freshly initialised adapter (a resumed run's weights load in ``train``).
    ``compute_dtype``: what the quant backend's dtype resolves to on ``device``;
    ``reference``: when the reference log-probabilities are computed
    (:func:`resolve_reference`)."""
    from lorakit.device import configure_malloc, configure_threads
    from lorakit.lora_init import finish_init, init_name
    from lorakit.modeling import (
        attach_new_adapter,
        cpu_loading,
        load_adapter,
        load_base_model,
        start_adapter_dir,
    )
    from lorakit.qpissa import (
        attach_initial,
        compute_residual,
        quantize_residual,
        quantizes_residual,
    )

    cpu = device == "cpu"
    threads = configure_threads(recipe.train.threads) if cpu else None
    if cpu:
        configure_malloc()  # LORAKIT_MALLOC: keep (default, fastest), return, glibc (device.py)
    backend = components.quant
    say(
        f"loading {data.ref.label or data.ref.path} on {device} (quant {recipe.quant.name}, "
        f"compute {compute_dtype}{f', {threads} threads' if threads else ''})"
    )
    from lorakit.device import dtype_name

    name = dtype_name(compute_dtype)
    if reference == "every_step":
        say(
            "reference log-probabilities: in each step, from the step's own packed row "
            "(one more forward without gradients)"
            + (f"; {name} rounds it as it rounds the policy's" if name != "fp32" else "")
        )
    elif reference == "once" and name != "fp32":
        setting = _dtype_setting(backend)[0]
        why = ""  # the recipe asked for once
        if recipe.train.reference_logps == "auto":  # auto gives once in bf16 under FSDP only,
            why = "under FSDP " if fsdp_launch() else "as the run started "  # or on a resume
        say(
            f"note: objective {recipe.train.objective} in {name} with the reference "
            f"log-probabilities computed once {why}(before training, in other batches than the "
            f"steps'): an answer's summed log-probability moves by up to ~1 nat with how the "
            f"answers are packed ({name} rounding; measured on SmolLM2-135M), noise the loss "
            f'sees against the reference; set train.reference_logps = "every_step" or '
            f'quant.{setting} = "fp32" where small differences matter (docs/preference.md)'
        )
    # on CPU, what loading, quantizing and the adapter's init free goes back to the OS, not
    # the heap (device.loading_memory: it set a QLoRA run's peak RSS before), and 4-bit
    # weights are quantized in chunks (quantize_cpu.py)
    with cpu_loading(backend.quantizes) if cpu else contextlib.nullcontext():
        residual = None
        if quantizes_residual(recipe, backend):
            # QPiSSA/QOLoRA: the init on the fp32 base first, then only its residual quantized
            residual = compute_residual(data.ref, components, recipe.train.seed, recipe.recipe_dir)
        model = load_base_model(data.ref, backend, device, recipe_dir=recipe.recipe_dir)
        if residual is not None:
            quantize_residual(model, residual)
        model = backend.prepare_for_training(model, recipe.train.gradient_checkpointing)
        start_adapter = start_adapter_dir(recipe, data.ref)
        if residual is not None:
            model = attach_initial(model, components, recipe.train.seed, residual)
            say(
                f"{init_name(recipe.peft.options)} init on the fp32 base ({len(residual.weights)} "
                "layers), only the residual quantized; the saved adapter is converted back"
            )
        elif start_adapter is None:
            model = attach_new_adapter(model, components.peft, recipe.train.seed)
            # LoftQ and EVA fit the adapter here; PiSSA/OLoRA keep their start for the export
            finish_init(
                model,
                components.peft,
                model_path=data.ref.path,
                train_rows=data.train_rows,
                batch_size=recipe.train.per_device_train_batch_size,
                say=say,
            )
        else:  # its own LoRA shape, trainable; [peft] is not used
            say(f"starting from the adapter in {start_adapter} (its own LoRA settings)")
            model = load_adapter(model, start_adapter, trainable=True)
    if cpu:
        # nn.Dropout's mask costs as much as a matmul on CPU; same rate, a third of the cost;
        # and each LoRA layer's step as one autograd node in the compute dtype (fused_lora.py).
        # Both step aside in eval mode: evaluation runs PEFT's own forward.
        from lorakit.fast_dropout import use_fast_dropout
        from lorakit.fused_lora import use_fused_lora
        from lorakit.fused_norm import use_fused_norm

        use_fast_dropout(model)
        use_fused_lora(model)
        use_fused_norm(model)  # RMSNorm as one node while autograd records (fused_norm.py)
    trainable, total = model.get_nb_trainable_parameters()
    say(
        f"{recipe.peft.name}: {trainable:,} trainable parameters of {total:,} "
        f"({100 * trainable / total:.2f}%)"
    )
    return TrainingModel(
        model=model,
        device=device,
        compute_dtype=compute_dtype,
        quantized_residual=residual is not None,
        reference=reference,
    )


def train(
    recipe: Recipe,
    tm: TrainingModel,
    data: RunData,
    run: RunDir,
    loggers: Loggers,
    start: Start,
) -> Any:
    """Phase 5: train with packed padding-free micro-batches, loss only at supervised
    positions; return the trainer, its model trained."""
    from lorakit.attention import packed_attention
    from lorakit.checkpoints import checkpoint_step, load_checkpoint_adapter
    from lorakit.device import objects_frozen_for_gc
    from lorakit.packing_probe import check_packing
    from lorakit.training import build_trainer, engine, planned_steps

    with packed_attention(tm.model, tm.device):
        # before anything packs rows (a preference run's reference pass does, before training)
        check_packing(recipe.train, tm.model, say)  # refuses rows whose examples mix
    if recipe.train.objective == "sft":
        trainer = build_trainer(
            recipe,
            tm.model,
            data.train_rows,
            data.val_rows,
            run.checkpoints,
            loggers,
            tm.device,
            tm.compute_dtype,
            merge_tokens=data.batch.get("merged_micro_batch_tokens", 0),
            share_prefix=data.batch.get("shared_prefix", False),
        )
    else:  # pairs (KTO: answers); the reference log-probabilities first (DPO, KTO), from
        # the untrained adapter
        from lorakit.kto_training import build_kto_trainer
        from lorakit.preference_training import build_preference_trainer

        kto = recipe.train.objective == "kto"
        build = build_kto_trainer if kto else build_preference_trainer
        trainer = build(
            recipe,
            tm.model,
            data.train_rows,
            data.val_rows,
            reference_for(recipe, tm, data),
            run.checkpoints,
            loggers,
            tm.device,
            tm.compute_dtype,
            **(
                {}
                if kto
                else {
                    "share_prefix": data.batch.get("shared_prefix", False),
                    "merge_tokens": data.batch.get("merged_micro_batch_tokens", 0),
                }
            ),
        )
    running = engine(trainer)
    if running:  # what accelerate really runs: FSDP asked for on a CPU would say DDP here
        say(f"engine: {running}")
    checkpoint = start.checkpoint
    done = checkpoint_step(checkpoint) if checkpoint else 0
    planned = planned_steps(trainer)
    if checkpoint and done > planned:  # fewer epochs than the checkpoint has trained
        raise RunError(
            f"{checkpoint.name} is past the {planned} steps train.num_train_epochs = "
            f"{recipe.train.num_train_epochs} comes to: resuming it would keep an adapter "
            "trained past the end",
            fix="resume with the run's num_train_epochs, or train the shorter run as a new one "
            f"(output.name={run.path.name}-2)",
        )
    if checkpoint and done >= planned:
        # The run was stopped after its last step (while saving the adapter or evaluating):
        # finish what is missing, train nothing more.
        say(f"{checkpoint.name} is the last step ({done}): not training, finishing the run")
        load_checkpoint_adapter(tm.model, checkpoint)
        trainer.state.global_step = done
    else:
        with (
            disk_full_is_an_error(run.checkpoints, "a checkpoint", lambda: _kept(run)),
            packed_attention(tm.model, tm.device),
            objects_frozen_for_gc(),
        ):
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        tokens, positions = trainer.positions
        if positions < tokens:
            whose = " of this rank's rows" if world_size() > 1 else ""
            say(
                f"a shared prefix: {positions:,} positions computed for {tokens:,} tokens"
                f"{whose} ({1 - positions / tokens:.0%} fewer; train.share_prefix)"
            )
    return trainer


def reference_mode(recipe: Recipe, compute_dtype: Any) -> str | None:
    """When this run's reference log-probabilities are computed: ``"every_step"`` or
    ``"once"`` (``train.reference_logps`` resolved for the compute dtype and the launch,
    :func:`lorakit.preference.reference_in_step`), None for an objective without a reference."""
    from lorakit.device import dtype_name
    from lorakit.preference import Objective, reference_in_step

    if not Objective.from_train(recipe.train).needs_reference:
        return None
    mode, name = recipe.train.reference_logps, dtype_name(compute_dtype)
    return "every_step" if reference_in_step(mode, name, fsdp_launch()) else "once"


def resolve_reference(recipe: Recipe, compute_dtype: Any, start: Start) -> str | None:
    """This run's reference mode (:func:`reference_mode`), except that a resumed run keeps the
    one it started with: the mode its run.json recorded, and ``"once"`` for a run started
    before lorakit recorded it (every such run computed its reference once). Resolving ``auto``
    again could pick another mode (another compute dtype, a newer lorakit), and the resumed
    steps would no longer be those of an uninterrupted run."""
    mode = reference_mode(recipe, compute_dtype)
    if mode is None or start.checkpoint is None:
        return mode
    kept = start.reference or "once"
    if kept != mode:
        why = (
            "run.json"
            if start.reference
            else "it began before run.json recorded the mode, when lorakit computed it once"
        )
        say(
            f'reference log-probabilities: "{kept}", as the run started ({why}), not '
            f'"{mode}", which train.reference_logps = "{recipe.train.reference_logps}" gives '
            "here now: a resume keeps the run's mode"
        )
    return kept


def reference_for(
    recipe: Recipe, tm: TrainingModel, data: RunData
) -> tuple[Sequence[Any], Sequence[Any]] | None:
    """DPO's reference: every train and val pair's log-probabilities under the model as it
    starts (the base, or the ``from_adapter`` it starts from), once, before training (KTO:
    every answer's); None for the reference-free objectives, and where the trainer computes
    them in each step (``train.reference_logps``)."""
    from lorakit.preference import reference_logps, reference_tokens

    if tm.reference != "once":
        return None
    budget = reference_tokens(recipe.train)
    if recipe.train.objective == "kto":
        from lorakit.kto import answer_reference_logps

        n = len(data.train_rows) + len(data.val_rows)
        say(f"reference log-probabilities of {n} answers")
        return (
            answer_reference_logps(tm.model, data.train_rows, tm.device, budget),
            answer_reference_logps(tm.model, data.val_rows, tm.device, budget),
        )
    say(f"reference log-probabilities of {len(data.train_rows) + len(data.val_rows)} pairs")
    # the val pairs' as evaluation scores them: whole rows
    shared = data.batch.get("shared_prefix", False)
    return (
        reference_logps(tm.model, data.train_rows, tm.device, budget, shared),
        reference_logps(tm.model, data.val_rows, tm.device, budget),
    )


def save_trained_adapter(
    recipe: Recipe, trainer: Any, tm: TrainingModel, data: RunData, run: RunDir
) -> SavedAdapter | None:
    """Phase 6: save the adapter with its tokenizer, chat template and stop tokens (rank 0;
    every rank takes part in gathering FSDP's shards). None on the other ranks."""
    from lorakit.device import dtype_name
    from lorakit.training import adapter_state

    meta: dict[str, Any] = {
        "lorakit_version": __version__,
        "base_model": data.ref.label or data.ref.path,
        "base_model_path": data.ref.path,
        "quant": recipe.quant.to_plain(),
        # what `auto` resolved to here: eval, generate and export load the model in it
        "compute_dtype": dtype_name(tm.compute_dtype),
        "format": recipe.format.name,
        "config_hash": recipe.config_hash(),
        "data_fingerprint": data.splits.fingerprint,
        "global_step": trainer.state.global_step,
    }
    if tm.reference:  # what `auto` resolved to
        meta["reference_logps"] = tm.reference
    from lorakit.lora_init import init_name, loftq_passes

    init = init_name(recipe.peft.options)
    if init != "default" and recipe.train.from_adapter is None:
        meta["init"] = init  # pissa/olora: the adapter is saved converted (lora_init.py)
        if loftq_passes(recipe.peft.options) > 1:
            meta["loftq_iter"] = loftq_passes(recipe.peft.options)
        if tm.quantized_residual:
            meta["quantized_residual"] = True  # QPiSSA: eval/export rebuild it (qpissa.py)
    if data.system_prompt is not None:  # generate and export prompt with it by default
        meta["system_prompt"] = data.system_prompt
    state = adapter_state(trainer)  # every rank: FSDP gathers the sharded LoRA weights
    if not is_main():
        return None
    tokenizer = data.tokenizer
    template = getattr(tokenizer, "chat_template", None)
    if data.system_prompt is not None and isinstance(template, str):
        # the saved template's default system prompt is the one trained with, not the base
        # model's ("You are a helpful AI assistant named ..."): a copy, training's is untouched
        import copy

        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = with_default_system(template, data.system_prompt)
    with disk_full_is_an_error(
        run.adapter, "the adapter", lambda: "no adapter folder was written; " + _kept(run)
    ):
        save_adapter(
            trainer.model, tokenizer, run.adapter, meta, data.end_of_turn, state_dict=state
        )
    say(f"adapter saved to {run.adapter}")
    return SavedAdapter(path=run.adapter, global_step=trainer.state.global_step)


def release_trainer(trainer: Any) -> Any | None:
    """The trained model, with everything else the trainer holds let go (the optimizer's
    state, the data loaders, accelerate's wrappers, the adapter's gradients), so evaluation
    runs with the model alone in memory. None when the engine shards the model's weights over
    the ranks (FSDP, DeepSpeed): one process cannot evaluate that, and the saved adapter is
    loaded again instead."""
    import gc

    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(
        trainer, "is_deepspeed_enabled", False
    )
    model = None if sharded else trainer.model
    if model is not None:
        for param in model.parameters():
            param.grad = None
    trainer.accelerator.free_memory()
    handler = trainer.callback_handler
    handler.model = handler.optimizer = handler.lr_scheduler = None
    handler.train_dataloader = handler.eval_dataloader = None
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    gc.collect()
    return model


def evaluate_trained(
    recipe: Recipe,
    components: Components,
    run: RunDir,
    data: RunData,
    model: Any | None,
    loggers: Loggers,
) -> Path | None:
    """Phase 7: score the trained model in memory (and its base, with the adapter switched
    off, when [eval].baseline) on the eval splits: eval_report.json, predictions.jsonl,
    loss.png and report.md in the run folder. A model sharded by the engine (``None``) is
    loaded again from the saved adapter instead."""
    from lorakit.evaluation.evaluate import evaluate, evaluate_run, plan_eval
    from lorakit.lora_init import rewrites_base

    if model is not None and rewrites_base(model):
        # its base holds the residual, so "adapter off" is not the base model: score the
        # saved (converted) adapter on the original base, as eval and export load it
        model = None
        import gc

        gc.collect()
    if model is None:
        return evaluate_run(recipe, components, run.path, adapter=True, say=say, ref=data.ref)
    plan = plan_eval(
        recipe,
        components.metrics,
        data.splits,
        components.formatter,
        data.tokenizer,
        stop_token_ids(data.tokenizer, data.end_of_turn),
        data.ref.label or data.ref.path,
        say,
    )
    if plan is None:
        return None
    return evaluate(
        model, plan, run.path, adapter_dir=run.adapter, with_base=recipe.eval.baseline, say=say
    )


def _find_checkpoint(
    run: RunDir, spec: str, recipe: Recipe
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """Rank 0's choice of checkpoint, the settings the resume changes (refusing the others,
    and a different number of processes: it would change the global batch and the data order)
    and what the run.json recorded at the start: the reference mode and the compute dtype
    (None where it has none), the micro-batch merge (0 where it has none) and the prefix
    sharing (False where it has none)."""
    steps = recipe.train.max_steps
    checkpoint = run.resolve_checkpoint(
        spec,
        on_skip=lambda c, why: say(f"skipping {c.name}: {why}"),
        last_step=steps if steps > 0 else None,  # epochs: checked once the trainer counts them
    )
    changed = run.resume_changes(recipe.resolved())
    started_by = read_json(run.run_json)
    note_other_version(started_by.get("lorakit_version"), str(run.path))
    if note := run.version_note():  # versions.json against what is installed now
        say(note)
    started = started_by.get("batch", {}).get("world_size", 1)
    if started != world_size():
        raise RunError(
            f"{run.path} was trained by {started} process(es), this resume has {world_size()}",
            fix=f"resume with the same number of processes (--nproc {started}); the global "
            "batch and each rank's share of the data depend on it",
        )
    recorded: dict[str, Any] = {
        field: value if isinstance(value := started_by.get(key), str) else None
        for field, key in (("reference", "reference_logps"), ("compute_dtype", "compute_dtype"))
    }
    recorded["merge_tokens"] = recorded_merge(started_by)
    recorded["share_prefix"] = started_by.get("batch", {}).get("shared_prefix") is True
    return checkpoint, changed, recorded


def dtype_change_note(components: Components, run: RunDir, started: str, now: str) -> str:
    """The line for a resume whose compute dtype is not the one the run started with: the
    recipe's ``auto`` picked another dtype on this machine (a CPU with or without fast bf16)."""
    key, value = _dtype_setting(components.quant)
    setting = f'quant.{key} = "{value}"' if value else "the quant plugin's dtype"
    return (
        f"note: {run.path} started computing in {started} and this machine computes in {now} "
        f"({setting} resolves per machine): training goes on in {now}, so the resumed steps "
        "are not bit for bit those of an uninterrupted run; resume on a machine of the kind "
        "that started it to keep them exact"
    )


def _dtype_setting(backend: Any) -> tuple[str, str | None]:
    """The quant backend's compute-dtype option under ``[quant]`` and its value; ``("dtype",
    None)`` for a backend that does not say (not a ``ComputeDtypeSwitch``)."""
    from lorakit.contracts import ComputeDtypeSwitch

    return backend.dtype_setting if isinstance(backend, ComputeDtypeSwitch) else ("dtype", None)


def _same_data(run: RunDir, fingerprint: str) -> None:
    if not run.data_report.is_file():
        return
    started_with = read_json(run.data_report).get("fingerprint")
    if started_with and started_with != fingerprint:
        raise DataError(
            f"the data changed since {run.path} started (fingerprint {started_with} -> "
            f"{fingerprint})",
            fix="resume with the data the run was trained on, or start a new run",
        )


def _kept(run: RunDir) -> str:
    """What a run that stopped writing keeps: its newest complete checkpoint."""
    done = run.complete_checkpoints()
    if not done:
        return "no checkpoint was completed (an unfinished one has no LORAKIT_COMPLETE marker)"
    return (
        f"the newest complete checkpoint is {done[-1].name} (a later one without its "
        "LORAKIT_COMPLETE marker is unfinished, and resume skips it)"
    )
