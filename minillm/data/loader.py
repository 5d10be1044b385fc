"""The training loader: a seeded per-epoch permutation in full global batches, rank-aware (rank r takes slice r of
every global batch), whose position Lightning saves in every checkpoint through the loader's `state_dict`, so a
resumed run draws exactly the batches an uninterrupted one would."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from datasets import Dataset
from torch.utils.data import DataLoader, Sampler


class ResumableSampler(Sampler[int]):
    """Indices of a per-epoch seeded permutation in full global batches; rank r takes slice r of each."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        weights: torch.Tensor | None = None,
        accumulate: int = 1,
    ) -> None:
        """With `weights` (target tokens per sample) every index comes as (index, total target tokens of its
        gradient-accumulation window over all ranks), for losses normalised per optimizer step."""
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.weights, self.accumulate = weights, accumulate
        self.epoch = 0
        self.start_batch = 0  # batches of this epoch already consumed (restored from a checkpoint)

    @staticmethod
    def _world() -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start_batch = 0
        self.epoch = epoch

    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self._world()[1])

    def __len__(self) -> int:
        return self.batches_per_epoch() * self.batch_size

    def __iter__(self) -> Iterator[int]:
        rank, world = self._world()
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        per_step = self.batch_size * world
        start, self.start_batch = self.start_batch, 0
        steps = self.batches_per_epoch()
        for step in range(start, steps):
            first = step * per_step + rank * self.batch_size
            batch = order[first : first + self.batch_size].tolist()
            if self.weights is None:
                yield from batch
                continue
            window = step // self.accumulate * self.accumulate  # first step of this accumulation window
            span = order[window * per_step : min(window + self.accumulate, steps) * per_step]
            total = int(self.weights[span].sum())
            yield from ((i, total) for i in batch)


class ResumableLoader(DataLoader):
    """A DataLoader that counts the batches it handed out and restores that position (Lightning saves its
    `state_dict` in every checkpoint)."""

    def __init__(self, dataset, sampler: ResumableSampler, **kwargs) -> None:
        generator = torch.Generator().manual_seed(sampler.seed)  # worker seeds never touch the global RNG
        super().__init__(
            dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True, generator=generator, **kwargs
        )
        self.consumed = 0

    def __iter__(self):
        self.consumed = self.sampler.start_batch
        for batch in super().__iter__():
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.epoch, self.sampler.start_batch = int(state["epoch"]), int(state["batches"])


class WindowTotals(torch.utils.data.Dataset):
    """Rows looked up by (index, window total) from a weighted ResumableSampler; the total rides along."""

    def __init__(self, rows: Dataset) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, total = key
        return {**self.rows[index], "window_tokens": total}
