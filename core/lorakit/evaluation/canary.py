"""The forgetting canary: did the tuned model get worse at everything else?

A task metric shows what fine-tuning gained; nothing in it shows what the model lost. The
canary scores the base and the tuned model on text that has nothing to do with the task and
ships with every Python install, read at run time (nothing is copied into lorakit): pages of
Python's own documentation (``pydoc_data.topics``) and the docstrings of a few standard-library
modules. Two numbers come out:

* ``general_loss``: the mean negative log-likelihood per token of that text (every token
  scored, no chat format: plain language modelling);
* ``general_stops``: the share of a few generic instructions, asked in the run's chat format,
  that the model answers and ends with its end-of-turn within a short budget (a model that
  forgot how to stop outside its task shows here).

The report shows them beside the task's scores, and warns when the tuned model's general loss
rose by more than ``[eval].canary_max_rise`` (relative). The texts are hashed into the report;
a reused baseline's canary counts only when the hash matches. Cost: a few thousand tokens of
forward passes and four short generations per model, seconds on the embedded model.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Sequence
from typing import Any

import attrs

from lorakit.data.tokenize import Tokenized
from lorakit.evaluation.numbers import fmt, nan_for_null

SPLIT = "general"  # the results row the canary writes (never a data split's name)
TOPICS = 12  # pages of Python's documentation, evenly spread over the topics
CHARS = 700  # the start of each page (and of each docstring)
MODULES = ("heapq", "bisect", "textwrap", "fractions")
INSTRUCTIONS = (
    "Name three primary colors.",
    "Write one sentence about the ocean.",
    "What is twelve plus seven?",
    "Give a synonym for happy.",
)
MAX_NEW_TOKENS = 32
KINDS = {"general_loss": "loss", "general_stops": "generation"}
HIGHER_IS_BETTER = {"general_loss": False, "general_stops": True}


def general_texts() -> list[str]:
    """The canary's texts, from this Python's standard library (empty when it has none of
    them: a stripped-down install)."""
    texts: list[str] = []
    pages: dict[str, str] = {}
    try:
        from pydoc_data.topics import topics

        pages = dict(topics)
    except ImportError:  # pragma: no cover - some distributions split pydoc_data out
        pass
    names = sorted(pages)
    step = max(len(names) // TOPICS, 1)
    texts += [pages[n][:CHARS] for n in names[::step][:TOPICS]]
    for name in MODULES:
        try:
            doc = importlib.import_module(name).__doc__
        except ImportError:  # pragma: no cover
            continue
        if doc and doc.strip():
            texts.append(doc.strip()[:CHARS])
    return [t for t in texts if t.strip()]


@attrs.frozen
class Canary:
    rows: list[Tokenized]  # general text, every token scored
    prompts: list[str]  # the generic instructions in the run's chat format
    digest: str  # of the texts and prompts: a baseline's canary counts only when it matches

    @property
    def counts(self) -> dict[str, Any]:
        return {
            "examples": len(self.rows),
            "supervised_tokens": sum(len(r.input_ids) - 1 for r in self.rows),
            "prompts": len(self.prompts),
        }


def prepare_canary(formatter: Any, tokenizer: Any, max_length: int) -> Canary | None:
    """Tokenize the canary's texts (each cut at ``max_length`` tokens) and render its prompts;
    None when this Python has no such texts."""
    from array import array

    from lorakit.contracts import Message
    from lorakit.data.tokenize import encode_with_offsets

    texts = general_texts()
    if not texts:
        return None
    ids_list, _ = encode_with_offsets(texts, tokenizer)
    rows = [
        Tokenized(input_ids=array("i", ids[:max_length]), labels=array("i", ids[:max_length]))
        for ids in ids_list
        if len(ids) > 1
    ]
    prompts = [formatter.render_prompt([Message("user", q)], tokenizer) for q in INSTRUCTIONS]
    digest = hashlib.sha256("\x00".join([*texts, *prompts]).encode()).hexdigest()[:16]
    return Canary(rows=rows, prompts=prompts, digest=digest)


def score_canary(
    model: Any, canary: Canary, tokenizer: Any, stop_ids: Sequence[int], batch_size: int
) -> dict[str, float]:
    """``general_loss`` and ``general_stops`` of ``model`` (as it is: disable its adapter
    around this call to score the base)."""
    from lorakit.decoding import generate
    from lorakit.evaluation.scoring import loss_sums

    nll, n = loss_sums(model, canary.rows, batch_size)
    gens = generate(
        model,
        tokenizer,
        canary.prompts,
        stop_ids=stop_ids,
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=len(canary.prompts),
    )
    return {
        "general_loss": nll / n if n else float("nan"),
        "general_stops": sum(g.stopped for g in gens) / len(gens) if gens else float("nan"),
    }


def rise(base: dict[str, float] | None, tuned: dict[str, float] | None) -> float | None:
    """The tuned model's general loss relative to the base's (0.05: 5% higher)."""
    if not base or not tuned:
        return None
    b, t = base.get("general_loss"), tuned.get("general_loss")
    if b is None or t is None or not b > 0:
        return None
    return (t - b) / b


def warning(relative_rise: float | None, max_rise: float) -> str | None:
    if relative_rise is None or relative_rise <= max_rise:
        return None
    return (
        f"the tuned model's loss on general text rose {100 * relative_rise:.1f}% over the base "
        f"model's (more than [eval].canary_max_rise = {max_rise:g}): it may have forgotten "
        "more than the task gained; fewer steps, a lower learning rate, a smaller r, or general "
        "examples mixed into the data keep more of it"
    )


@attrs.frozen
class GeneralScores:
    """The canary's scores of one evaluation, and how they go into its report."""

    canary: Canary
    base: dict[str, float] | None
    tuned: dict[str, float] | None
    max_rise: float

    @property
    def rise(self) -> float | None:
        return rise(self.base, self.tuned)

    @property
    def warning(self) -> str | None:
        return warning(self.rise, self.max_rise)

    def results(self, model: str, adapter: str | None) -> list[dict[str, Any]]:
        """Rows for ``eval_report.json``'s results, split ``general``: compare and the loggers
        read them like any split's."""
        rows = []
        for scores, which in ((self.base, None), (self.tuned, adapter)):
            if scores is not None:
                rows.append(
                    {
                        "model": model,
                        "adapter": which,
                        "split": SPLIT,
                        "metrics": scores,
                        "counts": self.canary.counts,
                    }
                )
        return rows

    def section(self) -> dict[str, Any]:
        """``eval_report.json``'s ``canary`` entry."""
        return {
            "digest": self.canary.digest,
            "metric_kinds": KINDS,
            "higher_is_better": HIGHER_IS_BETTER,
            "max_rise": self.max_rise,
            "rise": self.rise,
            "warning": self.warning,
        }

    def lines(self) -> list[str]:
        """What the run says."""
        parts = []
        for name, kind in KINDS.items():
            b = self.base.get(name) if self.base else None
            t = self.tuned.get(name) if self.tuned else None
            if b is not None and t is not None:
                parts.append(f"{name} {fmt(b, kind)} -> {fmt(t, kind)}")
            else:
                parts.append(f"{name} {fmt(b if t is None else t, kind)}")
        change = f" ({100 * self.rise:+.1f}% general loss)" if self.rise is not None else ""
        out = [f"general text (forgetting canary): {', '.join(parts)}{change}"]
        if self.warning:
            out.append(f"warning: {self.warning}")
        return out

    def markdown(self) -> list[str]:
        n = self.canary.counts
        lines = [
            f"## General text: forgetting canary ({n['examples']} passages of Python's own "
            f"documentation, {n['supervised_tokens']} tokens; {n['prompts']} generic "
            "instructions)",
            "",
            "| metric | base | tuned | change |",
            "|---|---:|---:|---:|",
        ]
        for name, kind in KINDS.items():
            b = self.base.get(name) if self.base else None
            t = self.tuned.get(name) if self.tuned else None
            change = ""
            if b is not None and t is not None:
                d = (t - b) * (100 if kind == "generation" else 1)
                change = f"{d:+.1f}" if kind == "generation" else f"{d:+.4f}"
            lines.append(f"| {name} | {fmt(b, kind)} | {fmt(t, kind)} | {change} |")
        lines.append("")
        if self.warning:
            lines += [f"**Warning:** {self.warning}", ""]
        return lines


def cached_canary(report: dict[str, Any], digest: str) -> dict[str, float] | None:
    """The base model's canary scores from a reused baseline report, when it scored the same
    texts and prompts."""
    section = report.get("canary")
    if not isinstance(section, dict) or section.get("digest") != digest:
        return None
    for entry in report.get("results", []):
        if entry.get("split") == SPLIT and entry.get("adapter") is None:
            metrics = entry.get("metrics")
            return nan_for_null(metrics) if isinstance(metrics, dict) else None
    return None
