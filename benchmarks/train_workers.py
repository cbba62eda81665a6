"""The contenders of ``bench_train.py`` that are not `lorakit run`: TRL, a pad-to-512 Trainer
script and a hand-written loop, each run in a process of its own by ``bench_train.py``:

    python benchmarks/train_workers.py NAME RECIPE STEPS

prints one JSON line ``{"records": [...], "dtype": ...}``: per optimizer step its end time,
useful tokens seen and loss (the last one also the process's peak memory), and what the
contender computed in (``fp32``, ``fp32 + bf16 autocast``, ...) as seen in its own model and
trainer. The rows are lorakit's, tokenized from the same recipe `lorakit run` trains.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SEED, BATCH, LR, RANK, ALPHA, DROPOUT = 42, 4, 2e-4, 16, 32, 0.05
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MAX_LENGTH = 2048


def lora_config() -> Any:
    """The LoRA settings every contender trains with (as lorakit's recipe sets them)."""
    from peft import LoraConfig

    return LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=DROPOUT,
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
    )


def short_dtype(dtype: Any) -> str:
    """``torch.bfloat16`` (or its str) -> ``"bf16"``; unknown names are returned as they are."""
    name = str(dtype).removeprefix("torch.")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)


def dtype_label(base: str, autocast: str = "", quant: str = "") -> str:
    """What a contender computes in: ``fp32``, ``bf16 base``, ``fp32 + bf16 autocast``,
    ``nf4/bf16`` (quantized weights / compute dtype)."""
    if quant:
        return f"{quant}/{base}"
    label = base if base == "fp32" else f"{base} base"
    return f"{label} + {autocast} autocast" if autocast else label


def trainer_dtype(model: Any, trainer: Any = None) -> str:
    """What a PEFT model computes in: its base q_proj weight's dtype, and the trainer's
    autocast (accelerate's native AMP) if any."""
    base = next(p.dtype for n, p in model.named_parameters() if "q_proj.base_layer.weight" in n)
    autocast = ""
    if trainer is not None and trainer.accelerator.native_amp:
        autocast = str(trainer.accelerator.mixed_precision)
    return dtype_label(short_dtype(base), autocast)


def _dataset(rows: list[Any]) -> Any:
    """The rows as a ``datasets.Dataset`` (lorakit keeps token ids in compact ``array``s, which
    arrow does not read: plain lists here)."""
    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": [list(r.input_ids) for r in rows], "labels": [list(r.labels) for r in rows]}
    )


def load_rows(recipe_path: Path) -> tuple[Any, list[Any], str]:
    from lorakit.catalog import default_catalog
    from lorakit.components import build_components
    from lorakit.data.pipeline import DataReport, load_splits, tokenize_examples
    from lorakit.modeling import load_tokenizer, resolve_model
    from lorakit.recipe import load_recipe

    catalog = default_catalog()
    recipe = load_recipe(recipe_path, catalog=catalog)
    components = build_components(recipe, catalog)
    ref = resolve_model(components.model_source)
    tok = load_tokenizer(ref, recipe_dir=recipe.recipe_dir)
    splits = load_splits(components.sources, recipe.data, recipe.recipe_dir, DataReport())
    formatter = components.formatter
    rows = tokenize_examples(splits.train, formatter, tok, MAX_LENGTH, "drop", DataReport())
    return tok, rows, ref.path


def _peft_model(path: str) -> Any:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.bfloat16 if cuda else torch.float32,
        device_map="cuda" if cuda else None,
    )
    torch.manual_seed(SEED)
    return get_peft_model(model, lora_config())


def _step_recorder(records: list[dict[str, Any]]) -> Any:
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                records.append(
                    {
                        "step": state.global_step,
                        "time": time.time(),
                        "tokens": state.num_input_tokens_seen,
                        "loss": logs["loss"],
                    }
                )

    return Recorder()


def worker_trainer(kind: str, recipe_path: Path, steps: int) -> tuple[list[dict[str, Any]], str]:
    import torch

    tok, rows, path = load_rows(recipe_path)
    # trl_bf16: TRL loads the model itself from the path (fp32 unless model_init_kwargs says
    # otherwise) and attaches the adapter from peft_config after set_seed(args.seed)
    model = path if kind == "trl_bf16" else _peft_model(path)
    records: list[dict[str, Any]] = []
    common = dict(
        output_dir=tempfile.mkdtemp(),
        seed=SEED,
        data_seed=SEED,
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    if kind == "pad512":
        from transformers import Trainer

        def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
            n = 512
            ids = torch.full((len(batch), n), tok.pad_token_id)
            labels = torch.full((len(batch), n), -100)
            mask = torch.zeros((len(batch), n), dtype=torch.long)
            for i, row in enumerate(batch):
                k = min(n, len(row["input_ids"]))
                ids[i, :k] = torch.tensor(row["input_ids"][:k])
                labels[i, :k] = torch.tensor(row["labels"][:k])
                mask[i, :k] = 1
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}

        from transformers import TrainingArguments

        data = _dataset(rows)
        trainer: Any = Trainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=data,
            data_collator=collate,
            callbacks=[_step_recorder(records)],
        )
    else:
        from trl import SFTConfig, SFTTrainer

        packing = kind == "trl_packing"
        if packing:
            # padding-free rows carry no attention mask, and "non_padding" would then count
            # input_ids != pad id: SmolLM2's pad is <|im_end|>, which ends every turn
            common["include_num_input_tokens_seen"] = "all"
        data = _dataset(rows)
        if packing:
            # TRL packs examples into max_length rows; 1 row of 1024 tokens a step is about the
            # tokens of 4 unpacked examples here (4 rows would make each step ~5x bigger)
            common["per_device_train_batch_size"] = 1
        peft_config = None
        if kind == "trl_bf16":
            # SFTConfig's own default (bf16 unless fp16): Trainer -> accelerate mixed_precision
            # "bf16" -> the model's forward wrapped in torch.autocast(<device>, bfloat16), on
            # CPU too; the fp32 weights, LoRA weights and optimizer state stay fp32
            common["bf16"] = True
            peft_config = lora_config()
        args = SFTConfig(
            **common,
            gradient_checkpointing=False,
            max_length=MAX_LENGTH if not packing else 1024,
            packing=packing,
            packing_strategy="bfd",
            dataset_kwargs={"skip_prepare_dataset": not packing},
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[_step_recorder(records)],
        )
    trainer.train()
    return records, trainer_dtype(trainer.model, trainer)


def worker_hand_loop(recipe_path: Path, steps: int) -> tuple[list[dict[str, Any]], str]:
    """What a careful user writes in 40 lines: PEFT model, AdamW, pad to the batch maximum."""
    import torch

    tok, rows, path = load_rows(recipe_path)
    model = _peft_model(path).train()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    generator = torch.Generator().manual_seed(SEED)
    order: list[int] = []
    while len(order) < steps * BATCH:  # a new shuffle per pass over the data
        order += torch.randperm(len(rows), generator=generator).tolist()
    records, seen = [], 0
    for step in range(steps):
        batch = [rows[i] for i in order[step * BATCH : (step + 1) * BATCH]]
        n = max(len(r.input_ids) for r in batch)
        ids = torch.full((len(batch), n), tok.pad_token_id)
        labels = torch.full((len(batch), n), -100)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
            labels[i, : len(r.labels)] = torch.tensor(r.labels)
            mask[i, : len(r.input_ids)] = 1
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seen += int(mask.sum())
        records.append({"step": step + 1, "time": time.time(), "tokens": seen, "loss": loss.item()})
    return records, trainer_dtype(model)


def main() -> None:
    name, recipe, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    from lorakit.device import configure_threads, peak_memory_gb

    configure_threads()
    if name == "hand_loop":
        records, dtype = worker_hand_loop(recipe, steps)
    else:
        records, dtype = worker_trainer(name, recipe, steps)
    records[-1]["peak_memory_gb"] = peak_memory_gb()
    print(json.dumps({"records": records, "dtype": dtype}))


if __name__ == "__main__":
    main()
