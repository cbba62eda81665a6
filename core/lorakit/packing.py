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
