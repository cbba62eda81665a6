"""``lorakit plan --quant-gap``: how much the recipe's quantization changes the base model, on
the user's own val examples, before any training.

The base is loaded twice, unquantized in fp32 and quantized as the run would load it, and both
score the same supervised tokens (the assistant turns of the first N val examples, as the run
tokenizes them): the loss of each, the KL divergence of the quantized model's next-token
distribution from the unquantized one's, and how often their top-1 tokens agree. An adapter
trained on the quantized base starts this far behind the unquantized model, and LoRA's
rank-r update has to spend capacity on it (QLoRA's usual "gap").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

# above these, the gap is worth acting on (a few % of loss is what QLoRA papers call small)
LOSS_RISE_LARGE = 0.02
TOP1_LOW = 0.90


@attrs.frozen
class Gap:
    examples: int
    tokens: int
    loss_full: float
    loss_quant: float
    kl: float  # mean over supervised tokens, nats
    top1: float  # share of supervised tokens whose argmax agrees

    @property
    def rise(self) -> float:
        return (self.loss_quant - self.loss_full) / self.loss_full

    @property
    def large(self) -> bool:
        return self.rise > LOSS_RISE_LARGE or self.top1 < TOP1_LOW


def _scores(model: Any, rows: Sequence[Any]) -> list[Any]:
    """Log-probabilities at each row's supervised positions (predicting label[t+1] at t)."""
    import torch

    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([list(row.input_ids)], device=device)
            labels = torch.tensor(list(row.labels), device=device)
            keep = (labels[1:] != -100).nonzero().squeeze(-1)
            logits = model(input_ids=ids).logits[0, :-1].float()
            out.append((logits[keep].log_softmax(-1), labels[1:][keep]))
    return out


def measure(full: Any, quant: Any, rows: Sequence[Any]) -> Gap:
    """Compare ``quant`` with ``full`` on the supervised tokens of ``rows``."""
    nll_f = nll_q = kl = agree = 0.0
    tokens = 0
    for (lp_f, target), (lp_q, _) in zip(_scores(full, rows), _scores(quant, rows), strict=True):
        idx = target.unsqueeze(-1)
        nll_f -= float(lp_f.gather(-1, idx).sum())
        nll_q -= float(lp_q.gather(-1, idx).sum())
        kl += float((lp_f.exp() * (lp_f - lp_q)).sum())
        agree += float((lp_f.argmax(-1) == lp_q.argmax(-1)).sum())
        tokens += int(target.numel())
    n = max(tokens, 1)
    return Gap(len(rows), tokens, nll_f / n, nll_q / n, kl / n, agree / n)


def advice(gap: Gap, quant: str) -> list[str]:
    """What to do about the gap, with its numbers."""
    lines = [
        f"quantization gap ({quant}) on {gap.examples} val examples, {gap.tokens} supervised "
        f"tokens: loss {gap.loss_full:.4f} unquantized -> {gap.loss_quant:.4f} quantized "
        f"({100 * gap.rise:+.1f}%), KL {gap.kl:.4f} nats/token, top-1 agreement "
        f"{100 * gap.top1:.1f}%"
    ]
    if not gap.large:
        lines.append(
            f"  small (loss within {100 * LOSS_RISE_LARGE:.0f}%, top-1 agreement at least "
            f"{100 * TOP1_LOW:.0f}%): the quantized base costs little here"
        )
        return lines
    lines.append(
        f"  large: the adapter starts {100 * gap.rise:.1f}% behind the unquantized model. "
        "Options, best first where memory allows:"
    )
    lines.append('  - no quantization ([quant] plugin = "none"): no gap; plan shows its memory')
    if quant != "bnb-8bit":
        lines.append(
            '  - 8-bit ([quant] plugin = "bnb-8bit"): a much smaller error, twice the 4-bit '
            "weight memory (run --quant-gap on it to see)"
        )
    if quant == "bnb-4bit":
        lines.append(
            "  - keep 4-bit and start the adapter from the quantization error: [peft] init = "
            '"loftq" (fits A and B to W - Q(W) before the first step; loftq_iter = 4: '
            "alternates the fit and the quantization), or from the weights' principal part: "
            'init = "pissa" (QPiSSA: only the residual is quantized)'
        )
    return lines


def run_gap(session: Any, examples: int, say: Callable[[str], None]) -> Gap | None:
    """Load the base twice, score ``examples`` val examples (train ones when val is empty)."""
    import torch

    from lorakit.data.pipeline import DataReport, load_splits
    from lorakit.data.rows import tokenize_examples
    from lorakit.device import resolve_device
    from lorakit.modeling import load_base_model, load_tokenizer, resolve_model

    recipe, components = session.recipe, session.components
    backend = components.quant
    if not backend.quantizes:
        say(f"[quant].plugin {recipe.quant.name!r} does not quantize: no quantization gap")
        return None
    splits = load_splits(components.sources, recipe.data, recipe.recipe_dir)
    pool, split = (splits.val, "val") if len(splits.val) else (splits.train, "train")
    chosen = list(pool[:examples])
    ref = resolve_model(components.model_source, recipe.model.name)
    tokenizer = load_tokenizer(ref, recipe_dir=recipe.recipe_dir)
    report = DataReport()
    rows = tokenize_examples(
        chosen, components.formatter, tokenizer, recipe.train.max_length, "drop", report
    )
    if not rows:
        say(f"no {split} example left after tokenizing: nothing to measure")
        return None
    device = resolve_device(recipe.train.device)
    say(f"loading the base twice (fp32, then {recipe.quant.name}) for {len(rows)} {split} examples")
    full = load_base_model(
        ref, backend, device, quantized=False, dtype=torch.float32, recipe_dir=recipe.recipe_dir
    ).eval()
    quant = load_base_model(ref, backend, device, recipe_dir=recipe.recipe_dir).eval()
    return measure(full, quant, rows)
