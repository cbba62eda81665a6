"""Parity of an export: does the merged model compute what base + adapter computed?

Probes are a few built-in conversations plus up to ``VAL_LIMIT`` examples of the run's val
split, rendered by the run's formatter exactly as in training. The reference is the fp32
unquantized base with the adapter attached (unmerged), or for a merge into the dequantized base
the quantized base + adapter as trained. Every other model is compared to it by
the max absolute logit difference over all probe positions, and by perplexity on the
supervised (assistant) tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import attrs

from lorakit.contracts import Example, Message

VAL_LIMIT = 6
MAX_TOKENS = 256
# An fp32 merge differs from base + adapter only by float rounding; more means a broken merge.
FP32_TOLERANCE = 1e-3

BUILTIN_PROBES = (
    (("user", "What is the capital of France?"), ("assistant", "The capital of France is Paris.")),
    (
        ("user", "Write a haiku about autumn."),
        ("assistant", "Red leaves drift and fall,\ncool wind hums."),
    ),
    (("system", "You answer briefly."), ("user", "2 + 2 ="), ("assistant", "4")),
)


@attrs.frozen
class Probes:
    input_ids: list[list[int]]
    labels: list[list[int]]
    source: str  # human description for parity.json and the model card


def _val_examples(run_dir: Path | None, limit: int) -> list[Example]:
    return split_examples(run_dir, "val", limit)


def split_examples(run_dir: Path | None, split: str, limit: int | None = None) -> list[Example]:
    """Up to ``limit`` examples of the run's ``data/splits/<split>.jsonl`` (all if None)."""
    if run_dir is None:
        return []
    path = run_dir / "data" / "splits" / f"{split}.jsonl"
    if not path.is_file():
        return []
    out: list[Example] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(out) >= limit:
                break
            rec = json.loads(line)
            if rec.get("messages"):
                msgs = tuple(Message(m["role"], m["content"]) for m in rec["messages"])
                out.append(Example(id=rec.get("id", "val"), messages=msgs))
            elif rec.get("text"):
                out.append(Example(id=rec.get("id", "val"), text=rec["text"]))
    return out


def build_probes(run_dir: Path | None, formatter: Any, tokenizer: Any) -> Probes:
    from lorakit.data.tokenize import tokenize_batch

    builtin = [
        Example(id=f"probe{i}", messages=tuple(Message(r, c) for r, c in conv))
        for i, conv in enumerate(BUILTIN_PROBES)
    ]
    val = _val_examples(run_dir, VAL_LIMIT)
    rows = tokenize_batch([formatter.render(ex, tokenizer) for ex in [*builtin, *val]], tokenizer)
    source = f"{len(builtin)} built-in conversations"
    if val:
        source += f" + {len(val)} examples of the run's val split"
    return Probes(
        input_ids=[list(r.input_ids[:MAX_TOKENS]) for r in rows],
        labels=[list(r.labels[:MAX_TOKENS]) for r in rows],
        source=source,
    )


def probe_logits(model: Any, probes: Probes, batch_size: int = 16) -> list[Any]:
    """fp32 logits of every probe (right-padded batches; padded positions are cut off)."""
    import torch

    device = next(model.parameters()).device
    out = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(probes.input_ids), batch_size):
            chunk = probes.input_ids[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, row in enumerate(chunk):
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            logits = (
                model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
            )
            out += [logits[i, : len(row)] for i, row in enumerate(chunk)]
    return out


def perplexity(logits: list[Any], probes: Probes) -> float:
    """exp(mean NLL) over all supervised tokens of all probes (token-weighted, no padding)."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    for lg, labels in zip(logits, probes.labels, strict=True):
        target = torch.tensor(labels[1:])
        keep = target != -100
        if not keep.any():
            continue
        total += float(F.cross_entropy(lg[:-1][keep], target[keep], reduction="sum"))
        count += int(keep.sum())
    return math.exp(total / count) if count else float("nan")


def max_abs_diff(reference: list[Any], other: list[Any]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(reference, other, strict=True))


@attrs.define
class ParityReport:
    """Collects comparisons against the reference logits; ``to_json`` is ``parity.json``."""

    probes: Probes
    reference: list[Any]
    reference_label: str
    rows: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    @property
    def reference_ppl(self) -> float:
        return perplexity(self.reference, self.probes)

    def add(self, key: str, label: str, logits: list[Any], **extra: Any) -> dict[str, Any]:
        ppl = perplexity(logits, self.probes)
        row = {
            "model": label,
            "max_abs_logit_diff": max_abs_diff(self.reference, logits),
            "ppl": ppl,
            "ppl_diff_vs_reference": ppl - self.reference_ppl,
            **extra,
        }
        self.rows[key] = row
        return row

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "reference": self.reference_label,
            "reference_ppl": self.reference_ppl,
            "probes": self.probes.source,
            "n_probes": len(self.probes.input_ids),
            "n_tokens": sum(len(x) for x in self.probes.input_ids),
            "n_supervised_tokens": sum(sum(t != -100 for t in x[1:]) for x in self.probes.labels),
            "comparisons": self.rows,
        }
        merged, quant = self.rows.get("merged"), self.rows.get("quantized")
        if merged and quant:
            out["quantized_vs_merged_ppl_diff"] = quant["ppl"] - merged["ppl"]
        return out

    def lines(self) -> list[str]:
        out = [
            f"parity on {self.probes.source} (reference: {self.reference_label}, ppl {self.reference_ppl:.4f})"
        ]
        for row in self.rows.values():
            out.append(
                f"  {row['model']}: max |logit diff| {row['max_abs_logit_diff']:.3g}, "
                f"ppl {row['ppl']:.4f} ({row['ppl_diff_vs_reference']:+.4f})"
            )
        return out
