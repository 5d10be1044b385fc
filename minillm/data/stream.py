"""Streaming pretraining: `data.sources.<name>.streaming=true` trains from the sources as they are read, without
materialising them (no records table, no tokenized cache): a corpus larger than the disk's cache budget.

The stream: the sources' records interleaved round-robin (one record of each in turn; a source that ends drops
out), sampled, capped and split by the same hashes as a materialised run, the training records tokenized, joined
with EOS and cut into windows of block_size + 1 tokens (overlapping by one, as when materialised), shuffled in a
seeded buffer of `SHUFFLE_WINDOWS` windows, and grouped into whole global batches, rank r taking slice r. Each pass over the sources is an
epoch (the shuffle is reseeded per epoch).

Validation: the held-out records among the first `VAL_SCAN_RECORDS` records of the stream, packed once at
set-up and kept in memory (at most `VAL_WINDOWS` windows); training never sees a held-out record.

Exact resume: the stream is a pure function of the sources, the settings and the seed, and the loader's position
(epoch, batches) is saved in every checkpoint; a resumed run replays the stream from the start of its epoch and
skips the batches already trained on (re-reading and tokenizing them, not training), so it sees exactly the
batches an uninterrupted run would — provided the sources hold the same data (a pinned `revision` for a hub
dataset).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

from minillm.data.hf import HFSource, read_source
from minillm.data.kinds import PRETRAIN
from minillm.data.records import BadRecords, DataError, is_held_out, is_sampled

SHUFFLE_WINDOWS = 1000
VAL_SCAN_RECORDS = 20_000
VAL_WINDOWS = 2000


class PretrainStream(IterableDataset):
    """The training windows of the interleaved sources (see the module docstring); `epoch` selects the shuffle."""

    def __init__(
        self,
        sources: list[Path | HFSource],
        ratios: list[float],
        val_ratios: list[float],
        caps: list[int | None],
        skip_bad: bool,
        tokenizer,
        window: int,
        seed: int,
        batch_size: int = 1,
        offset: float = 0.0,
    ) -> None:
        self.sources, self.ratios, self.val_ratios, self.caps = sources, ratios, val_ratios, caps
        self.offset = offset
        self.skip_bad, self.tokenizer, self.window, self.seed = skip_bad, tokenizer, window, seed
        self.batch_size, self.epoch = batch_size, 0

    def records(self) -> Iterator[tuple[str, bool]]:
        """(text, held out) of every sampled record, sources in turn."""
        bad = BadRecords(self.skip_bad)
        readers = [iter(read_source(s, PRETRAIN, bad)) for s in self.sources]
        kept = [0] * len(readers)
        live = list(range(len(readers)))
        while live:
            for i in list(live):
                text = next(readers[i], None)
                if text is None:
                    live.remove(i)
                    continue
                cap = self.caps[i]
                if not is_sampled(text, self.ratios[i], self.offset) or (cap is not None and kept[i] >= cap):
                    continue
                kept[i] += 1
                yield text, is_held_out(text, self.val_ratios[i])

    def pack(self, texts: Iterator[str]) -> Iterator[list[int]]:
        """Documents + EOS, cut into windows that overlap by one token (a long document costs linear time)."""
        stream: list[int] = []
        start, step = 0, self.window - 1
        for text in texts:
            stream.extend(self.tokenizer.encode(text))
            stream.append(self.tokenizer.eos_id)
            while len(stream) - start >= self.window:
                yield stream[start : start + self.window]
                start += step
            if start > 1 << 16:  # drop the consumed head now and then
                del stream[:start]
                start = 0

    def val_windows(self) -> list[dict]:
        held_out = (text for text, val in islice(self.records(), VAL_SCAN_RECORDS) if val)
        return [{"input_ids": torch.tensor(w)} for w in islice(self.pack(held_out), VAL_WINDOWS)]

    def shuffled(self) -> Iterator[list[int]]:
        """The training windows of this pass through a seeded shuffle buffer."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        buffer: list[list[int]] = []
        for window in self.pack(text for text, val in self.records() if not val):
            buffer.append(window)
            if len(buffer) >= SHUFFLE_WINDOWS:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict]:
        """Whole global batches (batch_size windows per rank), rank r taking slice r of each, as the materialised
        sampler does: every rank gets the same number of batches (a tail that fills no global batch is dropped
        on all of them), so none waits for another at the end of a pass."""
        rank, world = _world()
        per = self.batch_size
        group: list[list[int]] = []
        for window in self.shuffled():
            group.append(window)
            if len(group) == per * world:
                yield from ({"input_ids": torch.tensor(w)} for w in group[rank * per : (rank + 1) * per])
                group = []


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StreamLoader(DataLoader):
    """Batches of the stream, with its position (epoch, batches of it) in every checkpoint, as ResumableLoader.

    Lightning fetches one batch ahead from a loader without a length (to know the last one), so a batch counts
    as trained when the batch after it is asked for: at a step boundary `consumed` is the batches trained."""

    def __init__(self, stream: PretrainStream, batch_size: int) -> None:
        super().__init__(stream, batch_size=batch_size, drop_last=True)
        self.epoch, self.consumed = 0, 0

    def __iter__(self):
        self.dataset.epoch = self.epoch
        batches = super().__iter__()
        for _ in range(self.consumed):  # resumed mid-pass: replayed, not trained on
            next(batches, None)
        for batch in batches:
            yield batch
            self.consumed += 1
        if self.consumed == 0:  # Lightning would start pass after empty pass, forever
            raise DataError(
                "data.streaming: a whole pass over the sources gives fewer than one batch (data.batch_size windows of "
                "model.block_size + 1 tokens per rank); add data, or lower data.batch_size / model.block_size"
            )
        self.epoch, self.consumed = self.epoch + 1, 0  # a whole pass: the next starts over, reshuffled

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["batches"])
