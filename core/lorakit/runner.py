"""Run a recipe, phase by phase. Each phase is one call; read this file top to bottom."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit import __version__
from lorakit.catalog import Catalog
from lorakit.console import say
from lorakit.data.pipeline import (
    DataReport,
    load_splits,
    supervised_share,
    tokenize_examples,
    write_splits,
)
from lorakit.distributed import is_main
from lorakit.errors import DataError
from lorakit.export.adapter_io import save_adapter
from lorakit.recipe import Recipe
from lorakit.rundir import RunDir, read_json, write_json


def run_recipe(recipe: Recipe, catalog: Catalog, resume: str | None = None) -> Path:
    """Train an adapter for ``recipe``; return the run folder."""
    import transformers

    from lorakit.attention import packed_attention
    from lorakit.checkpoints import checkpoint_step, load_checkpoint_adapter
    from lorakit.device import configure_threads, resolve_device, return_freed_memory
    from lorakit.evaluation.evaluate import evaluate_run
    from lorakit.modeling import attach_new_adapter, load_base_model, load_tokenizer, resolve_model
    from lorakit.training import build_trainer, planned_steps

    transformers.logging.set_verbosity_error()
    run = RunDir(recipe.run_dir)

    # 1. Find the checkpoint to resume from (read only: nothing is written before the data and
    #    the tokenizer are known to be good, so a failed start never blocks the run name).
    checkpoint = None
    # Under torchrun/accelerate only rank 0 writes to the run folder.
    main_process = is_main()
    changed: dict[str, Any] = {}
    if resume:
        checkpoint = run.resolve_checkpoint(
            resume, on_skip=lambda c, why: say(f"skipping {c.name}: {why}")
        )
        changed = run.resume_changes(recipe.resolved())

    # 2. Read the data and split it deterministically.
    report = DataReport()
    splits = load_splits(recipe, catalog, report)
    if checkpoint is not None and run.data_report.is_file():
        started_with = read_json(run.data_report).get("fingerprint")
        if started_with and started_with != splits.fingerprint:
            raise DataError(
                f"the data changed since {run.path} started (fingerprint {started_with} -> "
                f"{splits.fingerprint})",
                fix="resume with the data the run was trained on, or start a new run",
            )

    # 3. Resolve the base model and load its tokenizer.
    ref = resolve_model(recipe, catalog)
    tokenizer = load_tokenizer(recipe, catalog, ref)

    # 4. Format and tokenize with completion-only labels.
    formatter = recipe.format.build(catalog)
    eot = formatter.end_of_turn(tokenizer)
    t = recipe.train
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

    # 5. Claim the run folder atomically (or record the resume), then write splits and report.
    if main_process:
        if checkpoint is not None:
            run.record_resume(checkpoint, list(recipe.overrides), changed)
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
            )
            say(
                f"run folder {run.path}"
                + (" (started again: the earlier attempt left no checkpoint)" if restarted else "")
            )
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
    for line in report.lines():
        say(line)
    say(f"train {len(train_rows)} / val {len(val_rows)} / test {len(splits.test)} examples")

    # 6. Seed everything that draws random numbers (LoRA init, dropout, data order).
    transformers.set_seed(t.seed)

    # 7. Load the base model, quantized by the recipe's backend.
    device = resolve_device(t.device)
    threads = configure_threads(t.threads) if device == "cpu" else None
    if device == "cpu":
        return_freed_memory()  # peak RSS = live tensors, not glibc's kept heap (see device.py)
    backend = recipe.quant.build(catalog)
    compute_dtype = backend.compute_dtype(device)
    say(
        f"loading {ref.label or ref.path} on {device} (quant {recipe.quant.name}, compute "
        f"{compute_dtype}{f', {threads} threads' if threads else ''})"
    )
    model = load_base_model(recipe, catalog, device, ref=ref)

    # 8. Prepare it for training (k-bit preparation, gradient checkpointing) before the adapter.
    model = backend.prepare_for_training(model, t.gradient_checkpointing)

    # 9. Attach a freshly initialised adapter (a resumed run's weights load in trainer.train).
    model = attach_new_adapter(model, recipe, catalog, t.seed)
    if device == "cpu":
        # nn.Dropout's mask costs as much as a matmul on CPU; same rate, a third of the cost
        from lorakit.fast_dropout import use_fast_dropout

        use_fast_dropout(model)
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
        run.metrics,
        device,
        compute_dtype,
    )
    done = checkpoint_step(checkpoint) if checkpoint else 0
    if checkpoint and done >= planned_steps(trainer):
        # The run was stopped after its last step (while saving the adapter or evaluating):
        # finish what is missing, train nothing more.
        say(f"{checkpoint.name} is the last step ({done}): not training, finishing the run")
        load_checkpoint_adapter(model, checkpoint)
        trainer.state.global_step = done
    else:
        with packed_attention(model, device):
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    # 11. Save the adapter with its tokenizer, chat template and stop tokens.
    meta: dict[str, Any] = {
        "lorakit_version": __version__,
        "base_model": ref.label or ref.path,
        "base_model_path": ref.path,
        "quant": recipe.quant.to_plain(),
        "format": recipe.format.name,
        "config_hash": recipe.config_hash(),
        "data_fingerprint": splits.fingerprint,
        "global_step": trainer.state.global_step,
    }
    if not main_process:
        return run.path
    save_adapter(trainer.model, tokenizer, run.adapter, meta, eot)
    say(f"adapter saved to {run.adapter}")

    # 12. Evaluate the saved adapter (and the base model, when [eval].baseline) on the eval
    #     splits: eval_report.json, predictions.jsonl, loss.png and report.md in the run folder.
    evaluate_run(recipe, catalog, run.path, adapter=True, say=say)
    return run.path
