"""Score one model on prepared splits: loss sums (token-weighted) and greedy generations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import attrs

from lorakit.contracts import GenerationMetric, LossMetric, Metric
from lorakit.data.tokenize import Tokenized
from lorakit.decoding import Generation, generate
from lorakit.evaluation.sets import EvalSet
from lorakit.progress import bar


@attrs.frozen
class SplitResult:
    split: str
    metrics: dict[str, float]
    counts: dict[str, Any]
    generations: list[Generation]
    # with a preference objective: each pair's (chosen - rejected) log-probability margin
    pair_margins: list[float] = attrs.field(factory=list)


def loss_sums(model: Any, rows: Sequence[Tokenized], batch_size: int) -> tuple[float, int]:
    """Summed NLL of every supervised token and their count, over all ``rows``.

    The same computation as the training step (``lorakit.loss.supervised_nll``): rows are
    packed ``batch_size`` at a time without padding, and logits are computed only where a token
    is supervised. Sums are accumulated in float64, so the result does not depend on
    ``batch_size``.
    """
    import torch

    from lorakit.attention import packed_attention
    from lorakit.loss import accepts_logits_to_keep, supervised_nll
    from lorakit.packing import pack

    device = next(model.parameters()).device
    head_kwarg = accepts_logits_to_keep(model)
    nll = 0.0
    count = 0
    model.eval()
    with torch.inference_mode(), packed_attention(model, device.type):
        for start in bar(range(0, len(rows), batch_size), desc="eval loss", unit="batch"):
            batch = pack([attrs.asdict(r) for r in rows[start : start + batch_size]])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            total, n = supervised_nll(model, batch, head_kwarg)
            nll += float(total.double())
            count += n
    return nll, count


def pair_margins(
    model: Any, pairs: Sequence[Any], batch_size: int, normalized: bool
) -> list[float]:
    """Each pair's log-probability of the chosen answer minus the rejected one's under
    ``model`` (per answer token when ``normalized``: SimPO and ORPO compare those)."""
    import torch

    from lorakit.attention import packed_attention
    from lorakit.loss import accepts_logits_to_keep
    from lorakit.preference import PairDataset, pack_pairs, sequence_logps, shares_prompt

    device = next(model.parameters()).device
    head_kwarg = accepts_logits_to_keep(model)
    data = PairDataset(pairs)
    out: list[float] = []
    model.eval()
    with torch.inference_mode(), packed_attention(model, device.type):
        for start in bar(range(0, len(pairs), batch_size), desc="pairs", unit="batch"):
            batch = pack_pairs(
                [data[i] for i in range(start, min(start + batch_size, len(pairs)))],
                share_prompt=shares_prompt(device.type),
            )
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            sums, counts = sequence_logps(model, batch, head_kwarg)
            values = (sums / counts.clamp(min=1) if normalized else sums).double()
            out += (values[0::2] - values[1::2]).cpu().tolist()
    return out


def answer_metrics(model: Any, answers: Sequence[Any], batch_size: int) -> dict[str, float]:
    """KTO's held-out answers: ``desirable_logp`` and ``undesirable_logp``, the mean
    log-probability per answer token of the desirable and of the undesirable answers (KTO
    should raise the first and lower the second)."""
    import torch

    from lorakit.attention import packed_attention
    from lorakit.loss import accepts_logits_to_keep
    from lorakit.packing import pack
    from lorakit.preference import sequence_logps

    device = next(model.parameters()).device
    head_kwarg = accepts_logits_to_keep(model)
    sums = {True: [0.0, 0.0], False: [0.0, 0.0]}  # desirable -> [log-prob, tokens]
    model.eval()
    with torch.inference_mode(), packed_attention(model, device.type):
        for start in bar(range(0, len(answers), batch_size), desc="answers", unit="batch"):
            chunk = answers[start : start + batch_size]
            batch = pack([{"input_ids": r.input_ids, "labels": r.labels} for r in chunk])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            logps, counts = sequence_logps(model, batch, head_kwarg)
            for row, lp, n in zip(chunk, logps.double().tolist(), counts.tolist(), strict=True):
                sums[row.desirable][0] += lp
                sums[row.desirable][1] += n
    out = {}
    for desirable, name in ((True, "desirable_logp"), (False, "undesirable_logp")):
        if sums[desirable][1]:
            out[name] = sums[desirable][0] / sums[desirable][1]
    return out


def preference_metrics(margins: Sequence[float]) -> dict[str, float]:
    """``pref_accuracy``: share of pairs whose chosen answer the model finds likelier;
    ``pref_margin``: the mean log-probability margin."""
    if not margins:
        return {}
    return {
        "pref_accuracy": sum(m > 0 for m in margins) / len(margins),
        "pref_margin": sum(margins) / len(margins),
    }


def _score(name: str, metric: Any, *args: Any) -> float:
    """``metric.score(*args)``; a metric plugin that fails is named, not a traceback."""
    from lorakit.errors import LorakitError, PluginError

    try:
        return float(metric.score(*args))
    except LorakitError:
        raise
    except Exception as exc:  # a plugin's bug: name it, keep the cause for --debug
        raise PluginError(
            f"metric {name!r} failed to score ({type(exc).__name__}: {exc})",
            where="[eval].metrics",
            fix="this is a bug in the metric plugin: report it to its author, or leave the "
            "metric out of [eval].metrics",
        ) from exc


def score_model(
    model: Any,
    tokenizer: Any,
    sets: Sequence[EvalSet],
    metrics: dict[str, Metric],
    *,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    gen_batch_size: int,
    loss_batch_size: int,
    normalized_pairs: bool = False,
) -> list[SplitResult]:
    """Every metric on every split for one model (base, or base + adapter)."""
    # ``kind`` says which of the two score signatures a metric has (lorakit.contracts)
    loss_metrics = {k: cast(LossMetric, m) for k, m in metrics.items() if m.kind == "loss"}
    gen_metrics = {
        k: cast(GenerationMetric, m) for k, m in metrics.items() if m.kind == "generation"
    }
    results = []
    for s in sets:
        values: dict[str, float] = {}
        if loss_metrics:
            nll, n = loss_sums(model, s.rows, loss_batch_size)
            values.update({k: _score(k, m, nll, n) for k, m in loss_metrics.items()})
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
                values[k] = _score(k, m, texts, s.references, stopped)
        margins: list[float] = []
        if s.pairs:
            margins = pair_margins(model, s.pairs, loss_batch_size, normalized_pairs)
            values.update(preference_metrics(margins))
        if s.answers:
            values.update(answer_metrics(model, s.answers, loss_batch_size))
        results.append(SplitResult(s.split, values, s.counts(), gens, margins))
    return results
