"""Option classes for the recipe sections the core owns: [data], [train], [eval], [output], [log].

Plugin sections ([model], [format], [quant], [peft], [[data.sources]]) are validated against the
chosen plugin's own ``Options`` class instead.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import attrs
from attrs import validators as v

from lorakit.options import finite as _finite
from lorakit.options import option

Objective = Literal["sft", "dpo", "orpo", "simpo", "kto"]

# The [train] keys of preference tuning, and the objectives each one is used by. An SFT recipe
# records none of them (resolved.json and the config hash of an SFT run are what they were
# before preference tuning existed); ``from_adapter`` is recorded whenever it is set.
PREFERENCE_KEYS: dict[str, tuple[str, ...]] = {
    "objective": ("dpo", "orpo", "simpo", "kto"),
    "beta": ("dpo", "simpo", "kto"),
    "loss_type": ("dpo",),
    "label_smoothing": ("dpo", "simpo"),
    "simpo_gamma": ("simpo",),
    "orpo_lambda": ("orpo",),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
    "kto_loss": ("kto",),
    "reference_logps": ("dpo", "kto"),
}
KTO_KEYS = ("desirable_weight", "undesirable_weight", "kto_loss")
# beta's default for each objective that uses it (DPO and KTO: TRL's 0.1; SimPO: the paper's 2.0)
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0, "kto": 0.1}

Scheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]


def run_name_problem(value: str) -> str | None:
    """Why ``value`` cannot name a folder under output.dir, or None: one path component, so
    a run (or a sweep's study) never lands outside output.dir or in another run's folder."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", value) or ".." in value:
        return (
            f"{value!r} is not a run folder name: use one path component of letters, digits, "
            "'.', '_' and '-' that starts with a letter or digit (no '/', no '..')"
        )
    return None


def _run_name(_inst, attribute, value):
    problem = run_name_problem(value)
    if problem:
        raise ValueError(problem)


# transformers' ``OptimizerNames`` values, kept here so that ``lorakit check`` validates
# ``train.optim`` without importing transformers; a test compares this with transformers.
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
    "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad",
    "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit",
    "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit",
    "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor",
    "galore_adamw_layerwise", "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise",
    "lomo", "adalomo", "grokadamw", "schedule_free_radam", "schedule_free_adamw",
    "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw",
)  # fmt: skip

# numpy and torch seeds must fit an unsigned 32-bit integer.
MAX_SEED = 2**32 - 1


def _optimizer(_inst, attribute, value):
    if value not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {value!r}; use one of transformers' optimizers: "
            + ", ".join(OPTIMIZERS)
        )


def _seed(_inst, attribute, value):
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"must be between 0 and 2**32-1 ({MAX_SEED}), got {value}")


def _not_negative_count(_inst, attribute, value):
    if value < 0:
        raise ValueError(
            f"must be 0 or more, got {value}; leave it unset to score every example (0 scores none)"
        )


def _at_least_one(unset: str):
    """A validator for an optional count: 1 or more; its message says what unset means."""

    def check(_inst, attribute, value):
        if value < 1:
            raise ValueError(f"must be 1 or more, got {value}; {unset}")

    return check


def _fraction(_inst, attribute, value):
    if not 0.0 <= value < 1.0:
        raise ValueError(f"must be at least 0 and below 1, got {value}")


@attrs.frozen
class DataSection:
    val_fraction: float = option(
        0.1, doc="share of examples held out for validation", validator=_fraction
    )
    test_fraction: float = option(
        0.1, doc="share of examples held out for test", validator=_fraction
    )
    split_seed: int = option(
        1234,
        doc="seed of the split hash; an example's split depends only on its content (not its id "
        "or meta) and this",
    )
    on_error: Literal["fail", "skip"] = option(
        "fail", doc="bad records: fail with file:line, or skip them and report each skip"
    )
    overlength: Literal["drop", "error", "truncate"] = option(
        "drop",
        doc="examples longer than train.max_length: drop (counted), stop with an error, or "
        "truncate (counted; an example whose answer would be cut off entirely is dropped)",
    )

    def __attrs_post_init__(self) -> None:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                "val_fraction + test_fraction must leave examples for training (sum below 1)"
            )


@attrs.frozen
class TrainSection:
    seed: int = option(
        42, doc="seeds LoRA init, dropout and data order (0 to 2**32-1)", validator=_seed
    )
    max_steps: int = option(-1, doc="optimizer steps to run; -1 means use num_train_epochs")
    num_train_epochs: float = option(
        1.0, doc="passes over the training split (when max_steps is -1)", validator=_finite
    )
    per_device_train_batch_size: int = option(
        4, doc="micro-batch size per device", validator=v.ge(1)
    )
    per_device_eval_batch_size: int = option(
        8, doc="batch size for loss evaluation", validator=v.ge(1)
    )
    gradient_accumulation_steps: int = option(
        1,
        doc="micro-batches per optimizer step (effective batch = this x batch size)",
        validator=v.ge(1),
    )
    learning_rate: float = option(2e-4, doc="peak learning rate", validator=[_finite, v.gt(0.0)])
    lr_scheduler_type: Scheduler = option("linear", doc="learning-rate schedule")
    warmup_ratio: float = option(
        0.0, doc="share of steps spent warming up the LR", validator=_fraction
    )
    weight_decay: float = option(0.0, doc="AdamW weight decay", validator=[_finite, v.ge(0.0)])
    max_grad_norm: float = option(1.0, doc="gradient clipping norm", validator=[_finite, v.gt(0.0)])
    optim: str = option(
        "adamw_torch",
        doc="optimizer name understood by transformers (e.g. paged_adamw_8bit on GPU)",
        validator=_optimizer,
    )
    logging_steps: int = option(1, doc="log loss every N steps", validator=v.ge(1))
    save_steps: int = option(50, doc="write a checkpoint every N steps", validator=v.ge(1))
    save_total_limit: int | None = option(
        None,
        doc="keep only the newest N checkpoints of this run (unset: keep all)",
        validator=v.optional(_at_least_one("leave it unset to keep every checkpoint")),
    )
    eval_steps: int | None = option(
        None,
        doc="also evaluate val loss every N steps (unset: only at the end)",
        validator=v.optional(_at_least_one("leave it unset to evaluate only at the end")),
    )
    gradient_checkpointing: bool = option(
        False, doc="trade compute for memory (non-reentrant, safe with LoRA and DDP)"
    )
    packing: bool = option(
        False,
        doc="fill each micro-batch by tokens (up to batch size x max_length) instead of a fixed "
        "number of examples; rows are always packed without padding either way",
    )
    max_length: int = option(1024, doc="longest tokenized example, in tokens", validator=v.ge(8))
    merge_micro_batches: bool = option(
        True,
        doc="on CPU, with gradient_accumulation_steps > 1: run the micro-batches of an optimizer "
        "step as fewer packed rows of up to 1024 tokens (never more than batch size x "
        "max_length, twice that for pairs): the same examples and loss, faster on small "
        "micro-batches, at the memory of the longer row; one process, sft, dpo, orpo and simpo, "
        "no NEFTune",
        recorded_when_set=True,
    )
    share_prefix: bool = option(
        True,
        doc="on CPU: the prefix every example of a packed row starts with (a chat template's "
        "system prompt, a fixed instruction) goes through the model once per row, not once per "
        "example: the same loss, fewer positions; sft, dpo, orpo and simpo, no NEFTune",
        recorded_when_set=True,
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = option(
        "auto", doc="where to train; auto picks cuda when available, else cpu"
    )
    dataloader_num_workers: int = option(0, doc="data loader worker processes", validator=v.ge(0))
    threads: int = option(
        0,
        doc="CPU threads for torch; 0: the cores this process may use, shared among the "
        "ranks torchrun started on this machine (OMP_NUM_THREADS, if set, wins)",
        validator=v.ge(0),
    )

    neftune_noise_alpha: float = option(
        0.0,
        doc="NEFTune: uniform noise of this scale (5 in the paper) on the input embeddings "
        "while training, scaled by 1/sqrt(length x width) of the packed row; 0: off",
        validator=[_finite, v.ge(0.0)],
        recorded_when_set=True,
    )

    objective: Objective = option(
        "sft",
        doc="what the adapter learns: sft (imitate the assistant turns), or from preference "
        "pairs: dpo, orpo or simpo; or from answers labelled desirable/undesirable (or "
        "pairs): kto (docs/preference.md)",
    )
    beta: float | None = option(
        None,
        doc="dpo and kto: strength of the pull towards the reference (default 0.1; lower "
        "drifts further); simpo: reward scale (default 2.0)",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge"] = option(
        "sigmoid", doc="dpo: sigmoid (the DPO paper), ipo (length-normalized squared) or hinge"
    )
    label_smoothing: float = option(
        0.0,
        doc="dpo (sigmoid) and simpo: assumed share of mislabeled pairs (conservative DPO), 0 to 0.5",
        validator=[_finite, v.ge(0.0), v.lt(0.5)],
    )
    simpo_gamma: float = option(
        0.5, doc="simpo: target reward margin between chosen and rejected", validator=_finite
    )
    orpo_lambda: float = option(
        0.1,
        doc="orpo: weight of the odds-ratio term next to the NLL of the chosen answer",
        validator=[_finite, v.gt(0.0)],
    )
    desirable_weight: float = option(
        1.0,
        doc="kto: weight of the desirable answers' losses (raise it when they are the fewer)",
        validator=[_finite, v.gt(0.0)],
    )
    undesirable_weight: float = option(
        1.0,
        doc="kto: weight of the undesirable answers' losses (raise it when they are the fewer)",
        validator=[_finite, v.gt(0.0)],
    )
    kto_loss: Literal["kto", "apo_zero_unpaired"] = option(
        "kto",
        doc="kto: the loss (TRL's loss_type): kto (against a KL reference point estimated from "
        "mismatched prompt/answer pairs) or apo_zero_unpaired (APO-zero, unpaired: pushes "
        "desirable answers up and undesirable ones down from the reference, no KL estimate)",
    )
    reference_logps: Literal["auto", "once", "every_step"] = option(
        "auto",
        doc="dpo and kto: when the reference model scores the answers: every_step (in the "
        "step's own packed row, one more forward without gradients per step, rounded as the "
        "policy's forward is), once (before training, in fixed batches: "
        "one pass for all epochs, but in bf16 the packing differs from the step's and moves "
        "a summed log-probability by up to ~1 nat), auto (every_step in bf16/fp16, once in "
        "fp32 and under FSDP)",
    )
    from_adapter: str | None = option(
        None,
        doc="start from this adapter (an SFT run folder, or its adapter/ folder; relative to "
        "the recipe file) instead of a fresh one; with dpo and kto it is also the reference model",
    )

    def __attrs_post_init__(self) -> None:
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"train.beta must be a number above 0, got {self.beta}")
        if self.beta is None and self.objective in DEFAULT_BETA:
            object.__setattr__(self, "beta", DEFAULT_BETA[self.objective])
        defaults = {f.name: f.default for f in attrs.fields(type(self))}
        for key, used_by in PREFERENCE_KEYS.items():
            value = getattr(self, key)
            unused = self.objective not in used_by
            if key != "objective" and value not in (defaults[key], None) and unused:
                kto = key == "loss_type" and self.objective == "kto"
                hint = " (KTO's loss is train.kto_loss)" if kto else ""
                raise ValueError(
                    f"train.{key} = {value!r} is not used by objective = "
                    f"{self.objective!r} (only by {', '.join(used_by)}){hint}; remove it or "
                    f"set train.objective"
                )
        if self.objective == "dpo" and self.loss_type != "sigmoid" and self.label_smoothing:
            raise ValueError(
                f"train.label_smoothing = {self.label_smoothing!r} is not used by loss_type = "
                f"{self.loss_type!r} (only by 'sigmoid', DPO's own loss); remove it or set "
                "train.loss_type = 'sigmoid'"
            )
        if (
            self.objective == "kto"
            and self.kto_loss == "kto"
            and self.per_device_train_batch_size < 2
        ):
            raise ValueError(
                "train.per_device_train_batch_size must be at least 2 with objective = 'kto': "
                "its KL estimate pairs each prompt with another example's answer of the same "
                "micro-batch; set train.per_device_train_batch_size = 2 or more"
            )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("max_steps must be a positive number of steps, or -1 for epochs")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ValueError(
                f"num_train_epochs must be above 0 when max_steps is -1, got "
                f"{self.num_train_epochs}; set num_train_epochs > 0 or max_steps > 0"
            )

    def plain(self) -> dict[str, object]:
        """The section as resolved.json records it: an SFT section without the preference keys
        (``from_adapter`` only when set), so SFT runs hash as they always did; a pair
        objective's without KTO's keys; ``kto_loss`` (KTO) and ``reference_logps`` (DPO, KTO)
        only when not the default."""
        from lorakit.options import to_plain

        out = to_plain(self)
        if self.objective == "sft":
            for key in PREFERENCE_KEYS:
                out.pop(key)
        elif self.objective != "kto":  # the pair objectives' runs hash as before KTO existed
            for key in KTO_KEYS:
                out.pop(key)
        elif self.kto_loss == "kto":  # KTO runs hash as before kto_loss existed
            out.pop("kto_loss")
        if "reference_logps" in out and self.reference_logps == "auto":
            out.pop("reference_logps")  # and runs as before it existed
        if self.from_adapter is None:
            out.pop("from_adapter")
        return out


def _eval_splits(_inst, attribute, value):
    bad = [s for s in value if s not in ("train", "val", "test")]
    if bad:
        raise ValueError(f"unknown split {bad[0]!r}; use train, val or test")
    if not value:
        raise ValueError(
            'the list is empty; name the splits to score, e.g. ["val"] or ["val", "test"] '
            "(eval.max_examples = 0 scores no example)"
        )
    twice = sorted({s for s in value if value.count(s) > 1})
    if twice:
        raise ValueError(f"{twice[0]!r} is listed twice; list each split once")


@attrs.frozen
class EvalSection:
    metrics: list[str] | None = option(
        None,
        doc="metric plugins to compute (lorakit plugins); unset: the metrics that declare "
        "themselves the default (built in: eval_loss and perplexity)",
    )
    splits: list[str] = option(
        factory=lambda: ("val",), doc="splits to evaluate: val and/or test", validator=_eval_splits
    )
    max_new_tokens: int = option(
        128, doc="generation budget for generation metrics", validator=v.ge(1)
    )
    batch_size: int = option(8, doc="batch size for generation", validator=v.ge(1))
    max_examples: int | None = option(
        None,
        doc="evaluate at most N examples per split (unset: all; 0: score no example)",
        validator=v.optional(_not_negative_count),
    )
    baseline: bool = option(True, doc="also score the base model without the adapter")
    canary: bool = option(
        True,
        doc="forgetting canary: also score base and tuned on general text (Python's own docs) "
        "and generic instructions, beside the task (seconds)",
    )
    canary_max_rise: float = option(
        0.1,
        doc="warn when the tuned model's loss on general text is this much (relative) above "
        "the base model's",
        validator=[_finite, v.ge(0.0)],
    )
    metric_options: dict[str, dict] = option(
        factory=dict,
        doc="options per metric, e.g. [eval.metric_options.exact_match] ignore_case = true",
    )
    lm_eval_tasks: list[str] = option(
        factory=tuple,
        doc='lm-evaluation-harness tasks or groups scored on base and tuned, e.g. ["arc_easy"] '
        "(needs pip install 'lorakit[lmeval]'; Hub tasks download their data)",
    )
    lm_eval_include: str | None = option(
        None,
        doc="folder of lm-eval task YAMLs (relative to the recipe file): local tasks, offline",
    )
    lm_eval_limit: int | None = option(
        None,
        doc="score at most N documents per lm-eval task (unset: all of them)",
        validator=v.optional(v.ge(1)),
    )
    lm_eval_num_fewshot: int | None = option(
        None,
        doc="few-shot examples per lm-eval prompt (unset: each task's own setting)",
        validator=v.optional(v.ge(0)),
    )
    lm_eval_batch_size: int = option(8, doc="batch size for lm-eval requests", validator=v.ge(1))

    def plain(self) -> dict[str, object]:
        """The section as resolved.json records it: without the lm-eval keys when no lm-eval
        task is asked for, so runs without one hash as they did before lm-eval existed."""
        from lorakit.options import to_plain

        out = to_plain(self)
        if not self.lm_eval_tasks:
            for key in LM_EVAL_KEYS:
                out.pop(key)
        return out


# [eval]'s lm-evaluation-harness keys (lorakit.evaluation.harness)
LM_EVAL_KEYS = (
    "lm_eval_tasks",
    "lm_eval_include",
    "lm_eval_limit",
    "lm_eval_num_fewshot",
    "lm_eval_batch_size",
)


@attrs.frozen
class OutputSection:
    dir: str = option("runs", doc="folder that holds run folders")
    name: str | None = option(
        None,
        doc="run folder name, one path component of letters, digits, '.', '_' and '-' "
        "(default: the recipe file's stem)",
        validator=v.optional(_run_name),
    )


@attrs.frozen
class LogSection:
    plugins: list[str] = option(
        factory=tuple,
        doc='experiment loggers besides metrics.jsonl (always written), e.g. ["tensorboard", '
        '"mlflow"] (lorakit plugins --kind logger)',
    )
    options: dict[str, dict] = option(
        factory=dict,
        doc='options per logger, e.g. [log.options.mlflow] tracking_uri = "http://host:5000"',
    )
