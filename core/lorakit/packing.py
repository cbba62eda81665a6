"""Padding-free batches: the examples of a micro-batch laid end to end in one row.

A padded batch of 4 rows spends as much compute on padding as the longest row dictates (47% of
the positions on real chat data of mixed lengths). Packing the same examples into one row
spends none, and gives the same result as long as

- attention stays inside each example: ``cu_seq_lens_q``/``cu_seq_lens_k`` (cumulative lengths,
  the flash-attention varlen convention) tell the attention function where each one starts, and
  ``position_ids`` restart at 0 so rotary embeddings see the same positions as alone;
- the targets never cross an example boundary: ``labels`` here are already *shifted* (position
  ``i`` holds the token that position ``i`` must predict, ``-100`` where nothing is supervised and
  at the last position of every example).

The examples of a step are the ones a padded batch would hold (same sampler, same order), so
packing changes the cost of a step, not what it trains on.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

IGNORE_INDEX = -100


def shifted_targets(input_ids: Sequence[int], labels: Sequence[int]) -> list[int]:
    """Next-token targets of one example: ``labels[1:]`` plus ``-100`` for the last position."""
    if len(input_ids) != len(labels):
        raise ValueError(f"input_ids ({len(input_ids)}) and labels ({len(labels)}) differ")
    return [*labels[1:], IGNORE_INDEX]


def pack(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Collate tokenized rows (``input_ids`` and unshifted ``labels``) into one packed row."""
    import torch

    if not rows:
        raise ValueError("cannot pack an empty batch")
    ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    bounds = [0]
    for row in rows:
        n = len(row["input_ids"])
        if n == 0:
            raise ValueError("cannot pack an empty example")
        ids.extend(row["input_ids"])
        positions.extend(range(n))
        targets.extend(shifted_targets(row["input_ids"], row["labels"]))
        bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = max(b - a for a, b in itertools.pairwise(bounds))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "labels": torch.tensor([targets], dtype=torch.long),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
        # which rows of the dataset this batch holds (the model never sees it)
        "row_index": torch.tensor([row.get("index", -1) for row in rows], dtype=torch.long),
    }


class RowDataset:
    """A list of tokenized rows as a map-style dataset (no Arrow conversion, no copies)."""

    def __init__(self, rows: Sequence[Any]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        return {"input_ids": row.input_ids, "labels": row.labels, "index": i}

    def lengths(self) -> list[int]:
        """Each row's tokens (memory-mapped rows answer without reading their tokens)."""
        from lorakit.data.row_files import row_lengths

        return row_lengths(self.rows)


def consecutive_batches(lengths: Sequence[int], budget: int) -> list[range]:
    """Rows in their order, cut into batches of as many as fit in ``budget`` tokens (a row
    longer than the budget is a batch of its own): the batches of a no-gradient pass over a
    split, which depend on the rows alone."""
    if budget < 1:
        raise ValueError(f"token budget must be positive, got {budget}")
    out: list[range] = []
    start, used = 0, 0
    for i, n in enumerate(lengths):
        if i > start and used + n > budget:
            out.append(range(start, i))
            start, used = i, 0
        used += n
    if start < len(lengths):
        out.append(range(start, len(lengths)))
    return out


# On a CPU a step of a few hundred tokens spends much of its time around the matmuls (per
# operator dispatch, attention per example, elementwise passes), and that share falls as the
# row grows: SmolLM2-135M's step trained 424, 447, 566 and 598 tokens/s with 1, 2, 4 and 8
# examples a micro-batch (``benchmarks/profile_step.py --batch``, bf16, 2 cores; about 150,
# 300, 600 and 1200 tokens), and 558 with 16. So the micro-batches of one optimizer step are
# run as fewer packed rows of up to this many tokens (:func:`merge_budget`).
MERGE_TOKENS = 1024
MERGED = "lorakit_merged_into_another"  # the key of a micro-batch left empty by a merge
# objectives whose micro-batches merge: SFT's examples, and DPO/ORPO/SimPO's pairs (their loss
# is a sum over pairs); KTO's mismatched rows are drawn per micro-batch
MERGING_OBJECTIVES = ("sft", "dpo", "orpo", "simpo")


def merge_budget(train: Any, device: str, world: int) -> int:
    """Tokens up to which the micro-batches of one optimizer step are merged into one packed
    row (0: not merged): on a CPU, in one process, for SFT, DPO, ORPO or SimPO with gradient
    accumulation and without NEFTune (whose noise scales with the packed row's length), when
    the recipe asks for it (``train.merge_micro_batches``). Never more than a micro-batch may
    already hold (``per_device_train_batch_size x max_length``, twice that for pairs, which
    have two sides of up to ``max_length`` each), so no merged row is longer than the
    recipe's own longest micro-batch (what the memory plan bounds: for pairs, both sides)."""
    if not (
        train.merge_micro_batches
        and device == "cpu"
        and world == 1
        and train.objective in MERGING_OBJECTIVES
        and train.gradient_accumulation_steps > 1
        and not train.neftune_noise_alpha
    ):
        return 0
    sides = 1 if train.objective == "sft" else 2
    return min(MERGE_TOKENS, sides * train.per_device_train_batch_size * train.max_length)


def merge_packed(batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One packed row from several of :func:`pack`'s (or
    :func:`lorakit.preference.pack_pairs`'), in order: the row they build from all their
    examples (every key equal)."""
    import torch

    if not batches:
        raise ValueError("cannot merge no micro-batches")
    if len(batches) == 1:
        return dict(batches[0])
    bounds = [batches[0]["cu_seq_lens_q"]]
    offset = int(batches[0]["input_ids"].shape[1])
    for b in batches[1:]:
        bounds.append(b["cu_seq_lens_q"][1:] + offset)
        offset += int(b["input_ids"].shape[1])
    cu = torch.cat(bounds)
    longest = max(int(b["max_length_q"]) for b in batches)
    out = {
        "input_ids": torch.cat([b["input_ids"] for b in batches], dim=1),
        "position_ids": torch.cat([b["position_ids"] for b in batches], dim=1),
        "labels": torch.cat([b["labels"] for b in batches], dim=1),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
        "row_index": torch.cat([b["row_index"] for b in batches]),
    }
    if "pairs" in batches[0]:
        out.update(_merged_pairs(batches))
    return out


def _merged_pairs(batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The keys of pair batches (:func:`lorakit.preference.pack_pairs`) merged: the pair count,
    each pair's shared prompt length (0 for a pair packed whole: its rejected side then
    attends to itself alone, which is right for a whole sequence) and reference values."""
    import torch

    out: dict[str, Any] = {"pairs": sum(b["pairs"] for b in batches)}
    if any("pair_prompt_lens" in b for b in batches):
        out["pair_prompt_lens"] = torch.cat(
            [
                b["pair_prompt_lens"]
                if "pair_prompt_lens" in b
                else torch.zeros(int(b["pairs"]), dtype=torch.int32)
                for b in batches
            ]
        )
    with_reference = ["reference" in b for b in batches]
    if any(with_reference) and not all(with_reference):
        raise ValueError("cannot merge pair batches with and without reference values")
    if all(with_reference):
        out["reference"] = torch.cat([b["reference"] for b in batches])
    return out


def merge_micro_batches(batches: Sequence[Mapping[str, Any]], budget: int) -> list[Any]:
    """The micro-batches of one optimizer step, consecutive ones merged into packed rows of up
    to ``budget`` tokens (one already longer stays alone), as a list as long as ``batches``:
    the merged rows last, each place a merge freed first, as an empty micro-batch (``MERGED``:
    the trainer skips it). The Trainer counts micro-batches to know when a step ends, so their
    number stays as it was.

    As few rows as the budget allows, and of even sizes: the smallest budget that still gives
    that few (8 micro-batches of 150 tokens under 1024 make two rows of 600, not 900 and 300).
    """
    import torch

    sizes = [int(b["input_ids"].shape[1]) for b in batches]
    groups = consecutive_batches(sizes, budget)
    if len(groups) == len(batches):
        return list(batches)
    low, high = 1, budget  # consecutive_batches(sizes, high) makes len(groups) rows
    while low < high:
        mid = (low + high) // 2
        if len(consecutive_batches(sizes, mid)) <= len(groups):
            high = mid
        else:
            low = mid + 1
    groups = consecutive_batches(sizes, high)
    empty = torch.zeros((1, 0), dtype=torch.long)
    freed = {"input_ids": empty, "labels": empty, MERGED: True}
    merged = [merge_packed([batches[i] for i in g]) for g in groups]
    return [dict(freed) for _ in range(len(batches) - len(merged))] + merged


class TokenBudgetBatches:
    """Micro-batches by tokens (``train.packing = true``): shuffled examples, each batch filled
    until the next example would pass ``budget`` tokens.

    Every example is used exactly once per epoch; one longer than the budget forms a batch of its
    own (``max_length`` already bounds it). The order is a seeded permutation of the epoch
    (``seed + epoch``), so a run and its resume see the same batches. The number of batches is the
    same in every epoch (the Trainer counts steps per epoch once): the greedy packing of epoch 0
    fixes it, and a later epoch whose packing comes out shorter splits its fullest batches, one
    that comes out longer merges its two smallest neighbours (that batch may then hold up to
    twice the budget).
    """

    def __init__(self, lengths: Sequence[int], budget: int, seed: int) -> None:
        if budget < 1:
            raise ValueError(f"token budget must be positive, got {budget}")
        self.lengths = list(lengths)
        self.budget = budget
        self.seed = seed
        self.epoch = 0
        self.count = len(self._greedy(0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _greedy(self, epoch: int) -> list[list[int]]:
        import torch

        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches = consecutive_batches([self.lengths[i] for i in order], self.budget)
        return [[order[k] for k in part] for part in batches]

    def _tokens(self, batch: list[int]) -> int:
        return sum(self.lengths[i] for i in batch)

    def batches(self) -> list[list[int]]:
        out = self._greedy(self.epoch)
        while len(out) < self.count:
            j = max(
                (k for k in range(len(out)) if len(out[k]) > 1), key=lambda k: self._tokens(out[k])
            )
            half = len(out[j]) // 2
            out[j : j + 1] = [out[j][:half], out[j][half:]]
        while len(out) > self.count:
            j = min(range(len(out) - 1), key=lambda k: self._tokens(out[k] + out[k + 1]))
            out[j : j + 2] = [out[j] + out[j + 1]]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return self.count


def token_budget_loader(trainer: Any, token_budget: int) -> Any:
    """The train loader of ``train.packing``: micro-batches of up to ``token_budget`` tokens,
    as many examples as fit, seeded, prepared by accelerate."""
    from torch.utils.data import DataLoader

    data = trainer.train_dataset
    lengths = (
        data.lengths()
        if isinstance(data, RowDataset)
        else [  # a preference pair's row says its length (both sides)
            row["length"] if "length" in row else len(row["input_ids"]) for row in data
        ]
    )
    batches = TokenBudgetBatches(lengths, token_budget, trainer.args.seed)
    loader = DataLoader(
        data,
        batch_sampler=batches,
        collate_fn=trainer.data_collator,
        num_workers=trainer.args.dataloader_num_workers,
    )
    return trainer.accelerator.prepare(loader)
