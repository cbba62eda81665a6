"""A prefix that every example of a packed row starts with, computed once for the whole row.

Chat data rendered through a template starts every example the same way: the template's
default system prompt (SmolLM2's is 20 tokens, Qwen2.5's and Llama 3.1's about as many), a
user's own fixed system prompt or instruction (often hundreds of tokens), the opening of the
user turn. Under causal attention a token sees only the tokens before it, so those first
``n`` positions hold the same hidden states in every example: computing them once per packed
row and letting every example attend to that one copy gives each example's log-probabilities
and gradients as computed whole (float sums in another order), for ``n x (examples - 1)``
fewer positions through the model. On the real chat data of ``benchmarks/bench_train.py``
(148 tokens an example on average, 24 of them the template's prefix) that is 12% of a
4-example row's positions.

The layout (:func:`share_row_prefix`, applied to a packed batch from
:func:`lorakit.packing.pack` or :func:`lorakit.preference.pack_pairs`): the shared prefix as
the row's first sequence, then each example's positions from ``n`` on, its ``position_ids``
continuing at ``n``; ``row_prefix_len`` tells the attention function (:func:`attend`) that
every later sequence also attends to the first. Only positions whose next-token target is
unsupervised are shared, so no loss term is lost or counted twice. A preference pair's
rejected answer (already packed without its prompt) keeps attending to its pair's prompt,
whose first ``n`` tokens are now the shared ones.

What changes, and where it applies (:func:`shares_row_prefix`): LoRA dropout draws one mask
for the shared positions instead of one per example; NEFTune's noise scales with the row's
length, so a run with NEFTune is left as it was. The attention is lorakit's CPU loop
(:mod:`lorakit.attention`); on a GPU one kernel call per layer does a whole row and knows
nothing of a shared prefix, so rows there are packed whole. The Trainer's count of tokens
seen counts every example whole (:data:`DATA_TOKENS`), the tokens trained on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorakit.data.tokenize import IGNORE_INDEX

# Shorter common prefixes are left in each example: sharing costs each example a copy of the
# prefix's keys and values (and queries) per layer, worth it only when it saves more than a
# few positions
MIN_SHARED = 8
# the batch key holding the tokens of the row's examples as packed whole
DATA_TOKENS = "lorakit_data_tokens"
PREFIX_KEY = "row_prefix_len"
OBJECTIVES = ("sft", "dpo", "orpo", "simpo")  # KTO's rows and mismatched rows pack apart


def shares_row_prefix(train: Any, device: str) -> bool:
    """Whether the packed rows of a run share their examples' common prefix: asked for
    (``train.share_prefix``), on a CPU (lorakit's own attention loop), for SFT, DPO, ORPO or
    SimPO, without NEFTune."""
    return bool(
        train.share_prefix
        and device == "cpu"
        and train.objective in OBJECTIVES
        and not train.neftune_noise_alpha
    )


def _segments(batch: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """The row's sequence bounds, and which sequences start at position 0 (the candidates
    for sharing): every one, except each pair's rejected answer when pairs are packed with
    their prompt once."""
    bounds = [int(b) for b in batch["cu_seq_lens_q"].tolist()]
    count = len(bounds) - 1
    if "pair_prompt_lens" in batch:
        return bounds, list(range(0, count, 2))
    return bounds, list(range(count))


def common_prefix(batch: Mapping[str, Any]) -> int:
    """Positions every candidate sequence of a packed row starts with and may share: the same
    tokens, none of them a position with a supervised target, and at least one position of
    each sequence left to it (and, for pairs, no more than each pair's shared prompt)."""
    bounds, starts = _segments(batch)
    if len(starts) < 2:
        return 0
    ids = batch["input_ids"][0].tolist()
    targets = batch["labels"][0].tolist()
    first = bounds[starts[0]]
    limit = min(bounds[s + 1] - bounds[s] for s in starts) - 1
    if "pair_prompt_lens" in batch:
        limit = min(limit, *(int(p) for p in batch["pair_prompt_lens"].tolist()))
    n = 0
    while n < limit:
        token = ids[first + n]
        if any(
            ids[bounds[s] + n] != token or targets[bounds[s] + n] != IGNORE_INDEX for s in starts
        ):
            break
        n += 1
    return n


def share_row_prefix(batch: Mapping[str, Any], minimum: int = MIN_SHARED) -> dict[str, Any]:
    """``batch`` with its examples' common prefix (:func:`common_prefix`) once, at the start of
    the row, or unchanged where that prefix is shorter than ``minimum`` positions."""
    import torch

    out = dict(batch)
    if PREFIX_KEY in batch:
        return out
    n = common_prefix(batch)
    if n < max(minimum, 1):
        return out
    bounds, starts = _segments(batch)
    shared = set(starts)
    keep = [torch.arange(bounds[starts[0]], bounds[starts[0]] + n)]
    lengths = [n]
    for s in range(len(bounds) - 1):
        begin = bounds[s] + (n if s in shared else 0)
        keep.append(torch.arange(begin, bounds[s + 1]))
        lengths.append(bounds[s + 1] - begin)
    index = torch.cat(keep).to(batch["input_ids"].device)
    for key in ("input_ids", "position_ids", "labels"):
        out[key] = batch[key].index_select(1, index)
    cu = torch.tensor([0, *lengths], dtype=batch["cu_seq_lens_q"].dtype).cumsum(0)
    out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu.to(batch["cu_seq_lens_q"].device)
    out[PREFIX_KEY] = torch.tensor(n, dtype=torch.int32)
    out[DATA_TOKENS] = int(batch["input_ids"].numel())
    return out


def data_tokens(batch: Mapping[str, Any]) -> int:
    """The tokens of a packed batch's examples, each counted whole."""
    if DATA_TOKENS in batch:
        return int(batch[DATA_TOKENS])
    return int(batch["input_ids"].numel())


def attend(
    query: Any,
    key: Any,
    value: Any,
    bounds: list[int],
    prefix: int,
    pair_prompts: list[int] | None,
    sdpa: Any,
) -> Any:
    """Attention over a row laid out by :func:`share_row_prefix` (``[1, heads, T, dim]`` in and
    out): each example (SFT), or each pair's chosen and rejected sequences (``pair_prompts``:
    each pair's prompt length as packed whole), attends to the prefix's keys and values put
    back in front of its own, as it would whole. ``sdpa(q, k, v, block, prompt, context)`` is
    one call of :func:`lorakit.attention._causal_sdpa`.

    Two ways to make that call. An unmasked causal call lets PyTorch's kernel skip the blocks
    above the diagonal, and an explicit mask makes it compute every block, so an example at
    least as long as the prefix puts the prefix's queries back too, for one causal call over
    the example whole (the prefix's output is kept from one of them); a shorter example, and
    every pair (whose attention needs a mask anyway), sends only its own queries, with a mask
    that opens the prefix to all of them. The prefix attends to itself alone (causal) unless a
    whole-example call already computed it."""
    import torch

    if bounds[0] != 0 or bounds[1] != prefix or bounds[-1] != query.shape[2]:
        raise RuntimeError("lorakit's packed attention: the shared prefix does not open the row")
    units: list[tuple[int, int | None, int]]  # own positions, pair block, the pair's prompt
    if pair_prompts is None:
        units = [(bounds[i + 1] - bounds[i], None, 0) for i in range(1, len(bounds) - 1)]
    else:
        if len(bounds) != 2 * len(pair_prompts) + 2:
            raise RuntimeError(
                "lorakit's packed attention: the pair boundaries do not cover the row"
            )
        units = [
            (bounds[2 * i + 3] - bounds[2 * i + 1], bounds[2 * i + 2] - bounds[2 * i + 1], n)
            for i, n in enumerate(pair_prompts)
        ]
    lengths = [prefix] + [u[0] for u in units]
    qs, ks, vs = (t.split(lengths, dim=2) for t in (query, key, value))
    head: Any = None  # the prefix's own output
    pieces = []
    for (own, block, prompt), q, k, v in zip(units, qs[1:], ks[1:], vs[1:], strict=True):
        k, v = torch.cat([ks[0], k], dim=2), torch.cat([vs[0], v], dim=2)
        if block is None and own >= prefix:
            out = sdpa(torch.cat([qs[0], q], dim=2), k, v, None, 0, 0)
            first, out = out.split([prefix, own], dim=2)
            head = first if head is None else head
        else:
            out = sdpa(q, k, v, block, prompt - prefix if block is not None else 0, prefix)
        pieces.append(out)
    if head is None:
        head = sdpa(qs[0], ks[0], vs[0], None, 0, 0)
    return torch.cat([head, *pieces], dim=2)
