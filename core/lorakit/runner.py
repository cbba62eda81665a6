"""Run a recipe, phase by phase. Each phase is one call; read this file top to bottom."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit import __version__, distributed
from lorakit.components import Components
from lorakit.console import note_other_version, say
from lorakit.data.pipeline import (
    DataReport,
    load_splits,
    require_training_examples,
    supervised_share,
    tokenize_examples,
    write_splits,
)
from lorakit.diskfull import disk_full_is_an_error
from lorakit.distributed import is_main, world_size
from lorakit.errors import DataError, RunError
from lorakit.export.adapter_io import save_adapter
from lorakit.recipe import Recipe
from lorakit.rundir import RunDir, read_json, write_json
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
    import transformers

    from lorakit.attention import packed_attention
    from lorakit.checkpoints import checkpoint_step, load_checkpoint_adapter
    from lorakit.device import configure_threads, dtype_name, resolve_device, return_freed_memory
    from lorakit.evaluation.evaluate import evaluate_run
    from lorakit.modeling import attach_new_adapter, load_base_model, load_tokenizer, resolve_model
    from lorakit.training import adapter_state, build_trainer, engine, planned_steps

    transformers.logging.set_verbosity_error()
    run = RunDir(recipe.run_dir)
    t = recipe.train

    # 0. Join the other ranks when torchrun/accelerate started several processes (gloo on CPU,
    #    nccl on CUDA). Rank 0 alone reads and writes the run folder and decides; the others
    #    receive its decisions, and an error there stops them all (lorakit.distributed.on_main).
    device = resolve_device(t.device)
    distributed.check_engine(device)
    distributed.init(device)
    main_process = is_main()

    # 1. Find the checkpoint to resume from (read only: nothing is written before the data and
    #    the tokenizer are known to be good, so a failed start never blocks the run name).
    checkpoint = None
    changed: dict[str, Any] = {}
    if resume:
        checkpoint, changed = distributed.on_main(lambda: _find_checkpoint(run, resume, recipe))

    # 2. Read the data and split it deterministically (every rank: it is cheap and identical).
    report = DataReport()
    splits = load_splits(components.sources, recipe.data, recipe.recipe_dir, report)
    require_training_examples(splits, recipe.data)
    if checkpoint is not None:
        distributed.on_main(lambda: _same_data(run, splits.fingerprint))

    # 3. Resolve the base model and load its tokenizer.
    ref = resolve_model(components.model_source, recipe.model.name)
    tokenizer = load_tokenizer(ref, recipe_dir=recipe.recipe_dir)

    # 4. Format and tokenize with completion-only labels.
    formatter = components.formatter
    eot = formatter.end_of_turn(tokenizer)
    train_rows = tokenize_examples(
        splits.train, formatter, tokenizer, t.max_length, recipe.data.overlength, report
    )
    val_rows = tokenize_examples(
        splits.val, formatter, tokenizer, t.max_length, recipe.data.overlength, DataReport()
    )
    if not train_rows:
        raise DataError(
            "no training example is left after formatting", fix="see data_report.json for why"
        )
    batch = distributed.batch_plan(t, world_size(), [len(r.input_ids) for r in train_rows])

    # 5. Claim the run folder atomically (or record the resume), then write splits and report:
    #    rank 0 only; the other ranks wait for it and stop if it fails.
    def claim() -> None:
        if checkpoint is not None:
            run.record_resume(checkpoint, list(recipe.overrides), changed, batch=batch)
            for key, (old, new) in changed.items():
                say(f"resume changes {key}: {old!r} -> {new!r}")
            say(f"resuming {run.path} from {checkpoint.name}")
        else:
            restarted = run.start(
                recipe.text,
                recipe.resolved(),
                list(recipe.overrides),
                recipe.config_hash(),
                recipe.path,
                batch=batch,
            )
            say(
                f"run folder {run.path}"
                + (" (started again: the earlier attempt left no checkpoint)" if restarted else "")
            )
        secret = masked_keys(recipe.settings())  # overrides included
        if secret:  # masked in what is written; say where such a secret belongs
            say(credentials_warning(secret))
        write_splits(run.splits, splits)
        write_json(
            run.data_report,
            {
                **report.to_json(),
                "fingerprint": splits.fingerprint,
                "counts": {
                    "train": len(train_rows),
                    "val": len(val_rows),
                    "test": len(splits.test),
                },
                "supervised_share": supervised_share(train_rows),
            },
        )
        # metrics.jsonl and the recipe's [log] plugins, each on a thread of its own
        loggers.open(
            dict(components.loggers),
            run_info(recipe, run, splits.fingerprint, resumed=checkpoint is not None),
        )

    distributed.on_main(claim)
    for line in report.lines():
        say(line)
    say(f"train {len(train_rows)} / val {len(val_rows)} / test {len(splits.test)} examples")
    say(distributed.describe(batch))

    # 6. Seed everything that draws random numbers (LoRA init, dropout, data order).
    transformers.set_seed(t.seed)

    # 7. Load the base model, quantized by the recipe's backend (one replica per rank, on its
    #    LOCAL_RANK device).
    threads = configure_threads(t.threads) if device == "cpu" else None
    if device == "cpu":
        return_freed_memory()  # LORAKIT_MALLOC=return: less RSS, slower steps (device.py)
    backend = components.quant
    compute_dtype = backend.compute_dtype(device)
    say(
        f"loading {ref.label or ref.path} on {device} (quant {recipe.quant.name}, compute "
        f"{compute_dtype}{f', {threads} threads' if threads else ''})"
    )
    model = load_base_model(ref, backend, device, recipe_dir=recipe.recipe_dir)

    # 8. Prepare it for training (k-bit preparation, gradient checkpointing) before the adapter.
    model = backend.prepare_for_training(model, t.gradient_checkpointing)

    # 9. Attach a freshly initialised adapter (a resumed run's weights load in trainer.train).
    model = attach_new_adapter(model, components.peft, t.seed)
    if device == "cpu":
        # nn.Dropout's mask costs as much as a matmul on CPU; same rate, a third of the cost;
        # and each LoRA layer's step as one autograd node in the compute dtype (fused_lora.py)
        from lorakit.fast_dropout import use_fast_dropout
        from lorakit.fused_lora import use_fused_lora

        use_fast_dropout(model)
        use_fused_lora(model)
    trainable, total = model.get_nb_trainable_parameters()
    say(
        f"{recipe.peft.name}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)"
    )

    # 10. Train: packed padding-free micro-batches, loss only at supervised positions.
    trainer = build_trainer(
        recipe,
        model,
        train_rows,
        val_rows,
        run.checkpoints,
        loggers,
        device,
        compute_dtype,
    )
    running = engine(trainer)
    if running:  # what accelerate really runs: FSDP asked for on a CPU would say DDP here
        say(f"engine: {running}")
    done = checkpoint_step(checkpoint) if checkpoint else 0
    if checkpoint and done >= planned_steps(trainer):
        # The run was stopped after its last step (while saving the adapter or evaluating):
        # finish what is missing, train nothing more.
        say(f"{checkpoint.name} is the last step ({done}): not training, finishing the run")
        load_checkpoint_adapter(model, checkpoint)
        trainer.state.global_step = done
    else:
        with (
            disk_full_is_an_error(run.checkpoints, "a checkpoint", lambda: _kept(run)),
            packed_attention(model, device),
        ):
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    # 11. Save the adapter with its tokenizer, chat template and stop tokens.
    meta: dict[str, Any] = {
        "lorakit_version": __version__,
        "base_model": ref.label or ref.path,
        "base_model_path": ref.path,
        "quant": recipe.quant.to_plain(),
        # what `auto` resolved to here: eval, generate and export load the model in it
        "compute_dtype": dtype_name(compute_dtype),
        "format": recipe.format.name,
        "config_hash": recipe.config_hash(),
        "data_fingerprint": splits.fingerprint,
        "global_step": trainer.state.global_step,
    }
    state = adapter_state(trainer)  # every rank: FSDP gathers the sharded LoRA weights
    if not main_process:
        return run.path
    with disk_full_is_an_error(
        run.adapter, "the adapter", lambda: "no adapter folder was written; " + _kept(run)
    ):
        save_adapter(trainer.model, tokenizer, run.adapter, meta, eot, state_dict=state)
    say(f"adapter saved to {run.adapter}")

    # 12. Evaluate the saved adapter (and the base model, when [eval].baseline) on the eval
    #     splits: eval_report.json, predictions.jsonl, loss.png and report.md in the run folder.
    loggers.flush()  # metrics.jsonl is complete before loss.png is drawn from it
    eval_report = evaluate_run(recipe, components, run.path, adapter=True, say=say, ref=ref)

    # 13. Send the final metrics (base and tuned) and the run's files to the loggers.
    log_outputs(loggers, run, eval_report, trainer.state.global_step)
    return run.path


def _find_checkpoint(run: RunDir, spec: str, recipe: Recipe) -> tuple[Path, dict[str, Any]]:
    """Rank 0's choice of checkpoint, and the settings the resume changes (refusing the others,
    and a different number of processes: it would change the global batch and the data order)."""
    checkpoint = run.resolve_checkpoint(
        spec, on_skip=lambda c, why: say(f"skipping {c.name}: {why}")
    )
    changed = run.resume_changes(recipe.resolved())
    started_by = read_json(run.run_json)
    note_other_version(started_by.get("lorakit_version"), str(run.path))
    started = started_by.get("batch", {}).get("world_size", 1)
    if started != world_size():
        raise RunError(
            f"{run.path} was trained by {started} process(es), this resume has {world_size()}",
            fix=f"resume with the same number of processes (--nproc {started}); the global "
            "batch and each rank's share of the data depend on it",
        )
    return checkpoint, changed


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
