"""Score one model on prepared splits: loss sums (token-weighted) and greedy generations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from lorakit.data.tokenize import IGNORE_INDEX, Tokenized
from lorakit.evaluation.sets import EvalSet
from lorakit.generation import Generation, generate


@attrs.frozen
class SplitResult:
    split: str
    metrics: dict[str, float]
    counts: dict[str, Any]
    generations: list[Generation]


def loss_sums(
    model: Any, rows: Sequence[Tokenized], batch_size: int, pad_id: int
) -> tuple[float, int]:
    """Summed NLL of every supervised token and their count, over all ``rows``.

    Rows are batched by length (little padding) and right-padded with ``-100`` labels; sums are
    accumulated in float64, so the result does not depend on ``batch_size``.
    """
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    nll = 0.0
    count = 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [rows[i] for i in order[start : start + batch_size]]
            width = max(len(r.input_ids) for r in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, r in enumerate(batch):
                n = len(r.input_ids)
                ids[j, :n] = torch.tensor(r.input_ids)
                labels[j, :n] = torch.tensor(r.labels)
                mask[j, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            target = labels[:, 1:].to(device)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            keep = target != IGNORE_INDEX
            picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            nll -= picked[keep].double().sum().item()
            count += int(keep.sum().item())
    return nll, count


def score_model(
    model: Any,
    tokenizer: Any,
    sets: Sequence[EvalSet],
    metrics: dict[str, Any],
    *,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    gen_batch_size: int,
    loss_batch_size: int,
) -> list[SplitResult]:
    """Every metric on every split for one model (base, or base + adapter)."""
    loss_metrics = {k: m for k, m in metrics.items() if m.kind == "loss"}
    gen_metrics = {k: m for k, m in metrics.items() if m.kind == "generation"}
    results = []
    for s in sets:
        values: dict[str, float] = {}
        if loss_metrics:
            nll, n = loss_sums(model, s.rows, loss_batch_size, tokenizer.pad_token_id)
            values.update({k: float(m.score(nll, n)) for k, m in loss_metrics.items()})
        gens: list[Generation] = []
        if gen_metrics and s.prompts:
            gens = generate(
                model,
                tokenizer,
                s.prompts,
                stop_ids=stop_ids,
                max_new_tokens=max_new_tokens,
                batch_size=gen_batch_size,
            )
            texts = [g.text for g in gens]
            stopped = [g.stopped for g in gens]
            for k, m in gen_metrics.items():
                values[k] = float(m.score(texts, s.references, stopped))
        results.append(SplitResult(s.split, values, s.counts(), gens))
    return results
