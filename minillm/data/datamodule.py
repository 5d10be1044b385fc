"""MiniLLMDataModule: resolve the data dir -> read and sample each source -> split -> tokenize -> pack -> load.

Records are read by our own line parser (errors name file:line) into a Hugging Face `datasets.Dataset` built
with `from_generator`; tokenization and packing are `Dataset.map` calls, cached on disk under
`data.cache_dir` and reused by later runs. Every record (also unsampled and bad ones) leaves a row with its
split, so `dataset_stats.json` can be written from the cached table without reading the files again.

The train loader is resumable: a seeded per-epoch permutation, rank-aware (rank r takes slice r of every
global batch), whose position Lightning saves in checkpoints through the loader's `state_dict`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from datasets import Dataset, disable_progress_bars
from datasets.exceptions import DatasetGenerationError
from torch.utils.data import DataLoader, Sampler

from minillm.config import DATA_DIR_ENV, DataConfig, SourceConfig
from minillm.data.builtin import DEFAULT_OUT as BUILTIN_DIR
from minillm.data.builtin import build_builtin
from minillm.data.records import (
    BadRecords,
    DataError,
    is_held_out,
    is_sampled,
    read_conversations,
    read_preferences,
    read_prompts,
    read_texts,
)
from minillm.generate import left_pad
from minillm.losses import IGNORE_INDEX
from minillm.tokenizer import Tokenizer, apply_chat_template

log = logging.getLogger(__name__)
PIPELINE_VERSION = 1  # part of every cache fingerprint: bump when reading/tokenizing/packing changes
PACK_BATCH = 2000  # documents per packing batch; the tail of each batch that fills no window is dropped


def resolve_data_dir(config: DataConfig) -> Path:
    """data.dir when given, else $MINIGPT_DATA_DIR, else the built-in corpus (built on first use)."""
    if config.dir:
        path, origin = Path(config.dir), "data.dir"
    elif os.environ.get(DATA_DIR_ENV):
        path, origin = Path(os.environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}"
    else:
        return build_builtin(BUILTIN_DIR)
    if not path.is_dir():
        raise DataError(f"data dir {path} (from {origin}) does not exist; point {origin} at a folder laid out "
                        "as <dir>/pretrain/*.jsonl|txt, <dir>/sft/*.jsonl, ... (docs/data.md)")
    return path


def find_files(data_dir: Path, subdir: str, patterns: tuple[str, ...] = ("*.jsonl", "*.txt")) -> list[Path]:
    folder = data_dir / subdir
    searched = [str(folder / p) for p in patterns]
    files = sorted(f for p in patterns for f in folder.glob(p) if f.is_file())
    if not files:
        for s in searched:
            log.error("no data file matches %s", s)
        raise DataError(f"no {subdir} data in {data_dir}: looked for {', '.join(searched)}. "
                        f"Put files there or set data.dir / {DATA_DIR_ENV} to a data dir with a {subdir}/ folder")
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{f}: the file is empty; remove it or fill it")
    return files


def _file_key(f: Path) -> str:
    st = f.stat()
    return f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _rows(files: list[str], ratios: list[float], val_ratios: list[float], caps: list[int | None], skip_bad: bool,
          kind: str, key: str) -> Iterator[dict]:
    """Every record of every file as a row: source, text, split (train / val / unsampled / bad).

    A record is sampled by a hash of its text (ratio), the first `cap` sampled records of a file are kept, and
    the kept ones are split by another hash. Chat records are stored as the JSON text of their message list.
    `key` (file sizes and mtimes) only feeds the cache fingerprint.
    """
    del key
    for name, ratio, val_ratio, cap in zip(files, ratios, val_ratios, caps):
        path = Path(name)
        bad = BadRecords(skip_bad)
        kept = 0
        readers = {"text": read_texts, "chat": read_conversations, "preference": read_preferences, "prompt": read_prompts}
        reader = readers[kind]
        for text in reader(path, bad):
            if not is_sampled(text, ratio) or (cap is not None and kept >= cap):
                yield {"source": path.stem, "text": "", "split": "unsampled"}
                continue
            kept += 1
            yield {"source": path.stem, "text": text, "split": "val" if is_held_out(text, val_ratio) else "train"}
        for _ in range(bad.counts.get(name, 0)):
            yield {"source": path.stem, "text": bad.examples[name], "split": "bad"}


class ResumableSampler(Sampler[int]):
    """Indices of a per-epoch seeded permutation in full global batches; rank r takes slice r of each."""

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool = True,
                 weights: torch.Tensor | None = None, accumulate: int = 1) -> None:
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
        super().__init__(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True,
                         generator=generator, **kwargs)
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


class MiniLLMDataModule(L.LightningDataModule):
    """kind="text": packed windows of block_size + 1 tokens. kind="chat": one conversation per row (or several
    per window with data.packing) with labels = -100 outside the assistant tokens, padded per batch."""

    def __init__(self, config: DataConfig, files: list[Path], tokenizer: Tokenizer, block_size: int, seed: int,
                 kind: str = "text", accumulate: int = 1, max_prompt_length: int = 128,
                 max_completion_length: int = 128):
        super().__init__()
        if kind not in ("text", "chat", "preference", "prompt"):
            raise ValueError(f"unknown data kind {kind!r}")
        if kind == "preference" and max_prompt_length + max_completion_length > block_size + 1:
            raise ValueError(f"stage.max_prompt_length + stage.max_completion_length = "
                             f"{max_prompt_length + max_completion_length} exceeds model.block_size + 1 = {block_size + 1}")
        self.lengths = (max_prompt_length, max_completion_length)
        self.config, self.files, self.tokenizer = config, files, tokenizer
        self.block_size, self.seed, self.kind, self.accumulate = block_size, seed, kind, accumulate
        self.train: Dataset | None = None
        self.val: Dataset | None = None
        self.stats: dict = {}
        unknown = sorted(set(config.sources) - {f.stem for f in files})
        if unknown:
            raise DataError(f"data.sources names {unknown}, but the data files are {[f.stem for f in files]}")

    def _source(self, f: Path) -> SourceConfig:
        src = self.config.sources.get(f.stem, SourceConfig())
        return src if isinstance(src, SourceConfig) else SourceConfig(**src)

    # ---- building the datasets ----
    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        disable_progress_bars()
        cache = Path(self.config.cache_dir)
        sources = [self._source(f) for f in self.files]
        kwargs = {
            "files": [str(f) for f in self.files],
            "ratios": [s.sample_ratio * self.config.sample_ratio for s in sources],
            "val_ratios": [self.config.val_ratio if s.val_ratio is None else s.val_ratio for s in sources],
            "caps": [s.max_samples for s in sources],
            "skip_bad": self.config.skip_bad_records,
            "kind": self.kind,
            "key": json.dumps([PIPELINE_VERSION] + [_file_key(f) for f in self.files]),
        }
        try:
            rows = Dataset.from_generator(_rows, gen_kwargs=kwargs, cache_dir=str(cache / "records"))
        except DatasetGenerationError as e:  # datasets wraps what the reader raised: show ours as it is
            cause = e.__cause__ or e.__context__
            raise (cause if isinstance(cause, DataError) else e) from None
        packing = self.kind == "text" or (self.kind == "chat" and self.config.packing)
        fingerprint = hashlib.sha256(
            f"{rows._fingerprint}|{self.tokenizer.sha256}|{self.block_size}|{packing}|{self.lengths}|"
            f"{PIPELINE_VERSION}".encode()
        ).hexdigest()[:32]
        splits = Counter(rows["split"])
        if splits["train"] == 0:
            raise DataError(
                f"no training records in {', '.join(f.name for f in self.files)}: of {sum(splits.values())} records, "
                f"{splits['bad']} are bad (skipped), {splits['unsampled']} are left out by sampling "
                f"(data.sample_ratio, data.sources.<name>.sample_ratio / max_samples), {splits['val']} are held out "
                "for validation. Raise the sampling ratios or caps, fix the bad records, or add data"
            )
        tokenized = rows.filter(lambda s: s in ("train", "val"), input_columns="split", new_fingerprint=f"sel-{fingerprint}")
        window = self.block_size + 1
        tokenize = {
            "text": (_tokenize, {"tokenizer": self.tokenizer}),
            "chat": (_tokenize_chat, {"tokenizer": self.tokenizer, "window": window}),
            "preference": (_tokenize_pair, {"tokenizer": self.tokenizer, "lengths": self.lengths}),
            "prompt": (_tokenize_prompt, {"tokenizer": self.tokenizer, "max_length": self.lengths[0]}),
        }[self.kind]
        tokenized = tokenized.map(
            tokenize[0], batched=True, fn_kwargs=tokenize[1], num_proc=self._num_proc(len(tokenized)),
            new_fingerprint=f"tok-{fingerprint}", desc="tokenize",
        )
        pack = (_pack, {"window": window, "eos": self.tokenizer.eos_id}) if self.kind == "text" else (
            _pack_chat, {"window": window})
        packed = {}
        for split in ("train", "val"):
            part = tokenized.filter(lambda s, want=split: s == want, input_columns="split",
                                    new_fingerprint=f"{split}-{fingerprint}")
            if packing:
                part = part.map(pack[0], batched=True, batch_size=PACK_BATCH, remove_columns=part.column_names,
                                fn_kwargs=pack[1], new_fingerprint=f"pack-{split}-{fingerprint}", desc=f"pack {split}")
            packed[split] = part.with_format("torch")
        self.train, self.val = packed["train"], packed["val"]
        self.stats = self._stats(rows, tokenized, sources)
        if len(self.train) < self.config.batch_size:
            raise DataError(
                f"the training split has {len(self.train)} rows (of up to {window} tokens), fewer than one batch "
                f"(data.batch_size={self.config.batch_size}) after sampling; add data, raise data.sample_ratio or "
                "lower data.batch_size / model.block_size")

    def _num_proc(self, n: int) -> int | None:
        return self.config.num_proc if self.config.num_proc > 1 and n >= 1000 else None

    def _stats(self, rows: Dataset, tokenized: Dataset, sources: list[SourceConfig]) -> dict:
        per: dict[str, dict] = {}
        for f, src in zip(self.files, sources):
            per[f.stem] = {"file": str(f), "raw_records": 0, "bad_records": 0, "sampled_records": 0, "train_records": 0,
                           "val_records": 0, "train_tokens": 0, "val_tokens": 0, "config": asdict(src)}
        for source, split in zip(rows["source"], rows["split"]):
            s = per[source]
            if split == "bad":
                s["bad_records"] += 1
                continue
            s["raw_records"] += 1
            if split in ("train", "val"):
                s["sampled_records"] += 1
                s[f"{split}_records"] += 1
        for source, split, n in zip(tokenized["source"], tokenized["split"], tokenized["length"]):
            per[source][f"{split}_tokens"] += n + (self.kind == "text")  # text: + the EOS separator
        if self.kind in ("chat", "preference", "prompt"):
            for s in per.values():
                s.update(train_assistant_tokens=0, truncated=0)  # completion tokens for pairs
            for source, split, n, cut in zip(tokenized["source"], tokenized["split"], tokenized["n_targets"],
                                             tokenized["truncated"]):
                per[source]["train_assistant_tokens"] += n if split == "train" else 0
                per[source]["truncated"] += int(cut)
        for name, s in per.items():
            s["val_ratio"] = s["val_records"] / max(s["sampled_records"], 1)
            if s["train_records"] == 0:
                log.warning("data source %s contributes no training records (%s)", name, s["file"])
            if s["bad_records"]:
                log.warning("data source %s: skipped %d bad records", name, s["bad_records"])
        total = sum(s["train_tokens"] for s in per.values())
        if self.kind == "text":  # windows share one token: each window adds block_size targets
            efficiency = len(self.train) * self.block_size / max(total, 1)  # tokens trained on / read
        elif self.kind == "chat" and self.config.packing:
            efficiency = total / max(len(self.train) * (self.block_size + 1), 1)  # window slots filled
        else:
            efficiency = None  # padded per batch
        return {
            "kind": self.kind,
            "sources": per,
            "block_size": self.block_size,
            "train_rows": len(self.train),
            "val_rows": len(self.val),
            "train_tokens": total,
            "packing_efficiency": efficiency,
            "tokenizer_sha256": self.tokenizer.sha256,
        }

    def write_stats(self, path: Path) -> None:
        path.write_text(json.dumps(self.stats, indent=2, ensure_ascii=False), encoding="utf-8")

    # ---- loaders ----
    def train_dataloader(self) -> ResumableLoader:
        if self.kind != "chat":
            sampler = ResumableSampler(len(self.train), self.config.batch_size, self.seed)
            collate = self.collate if self.kind in ("preference", "prompt") else None
            return ResumableLoader(self.train, sampler, num_workers=self.config.num_workers, collate_fn=collate)
        weights = self.train.with_format("torch")["n_targets"]
        sampler = ResumableSampler(len(self.train), self.config.batch_size, self.seed, weights=weights,
                                   accumulate=self.accumulate)
        return ResumableLoader(_WindowTotals(self.train), sampler, num_workers=self.config.num_workers,
                               collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None or len(self.val) == 0:
            return []
        return DataLoader(self.val, batch_size=self.config.batch_size, shuffle=False,
                          num_workers=self.config.num_workers, generator=torch.Generator().manual_seed(self.seed),
                          collate_fn=self.collate if self.kind != "text" else None)

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.kind == "prompt":
            return self.collate_prompts(rows)
        return self.collate_padded(rows)

    def collate_prompts(self, rows: list[dict]) -> dict:
        """Prompts left-padded for generation: input_ids and attention_mask (B, P), and the records (dicts)
        for reward functions that read their fields."""
        ids, mask = left_pad([r["prompt_ids"].tolist() for r in rows], self.tokenizer.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "records": [json.loads(r["text"]) for r in rows]}

    def collate_padded(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Right-pad rows to the longest sequence in the batch (chosen and rejected share one width): pad id for
        ids, -100 for labels, position 0 for positions."""
        fill = {"input_ids": self.tokenizer.pad_id, "labels": IGNORE_INDEX, "position_ids": 0,
                "chosen_ids": self.tokenizer.pad_id, "chosen_labels": IGNORE_INDEX,
                "rejected_ids": self.tokenizer.pad_id, "rejected_labels": IGNORE_INDEX}
        keys = [k for k in fill if k in rows[0]]
        width = max(len(r[k]) for r in rows for k in keys)
        batch = {k: torch.stack([F.pad(r[k], (0, width - len(r[k])), value=fill[k]) for r in rows]) for k in keys}
        batch["truncated"] = torch.stack([r["truncated"] for r in rows])
        if "window_tokens" in rows[0]:
            batch["window_tokens"] = torch.tensor([r["window_tokens"] for r in rows])
        return batch


def _tokenize(batch: dict, tokenizer: Tokenizer) -> dict:
    ids = tokenizer.sp.encode(batch["text"])
    return {"ids": ids, "length": [len(x) for x in ids]}


def _pack(batch: dict, window: int, eos: int) -> dict:
    """Concatenate documents with EOS after each and cut full windows; windows overlap by one token, so every
    token is a target exactly once."""
    stream: list[int] = []
    for ids in batch["ids"]:
        stream.extend(ids)
        stream.append(eos)
    step = window - 1
    n = (len(stream) - 1) // step
    return {"input_ids": [stream[i * step : i * step + window] for i in range(n)]}


class _WindowTotals(torch.utils.data.Dataset):
    """Rows looked up by (index, window total) from a weighted ResumableSampler; the total rides along."""

    def __init__(self, rows: Dataset) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, total = key
        return {**self.rows[index], "window_tokens": total}


def encode_chat(tokenizer: Tokenizer, messages: list[dict], window: int) -> tuple[list[int], list[int], bool]:
    """(ids, labels, truncated) of one conversation in at most `window` tokens.

    Too long: drop the oldest whole exchanges (a system prompt stays) while another assistant turn remains;
    still too long: cut the end off, or — when that would leave no assistant token — the start.
    """
    system = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(system) :]
    truncated = False
    while True:
        enc = apply_chat_template(tokenizer, system + rest)
        first_answer = next(i for i, m in enumerate(rest) if m["role"] == "assistant")
        if len(enc.ids) <= window or not any(m["role"] == "assistant" for m in rest[first_answer + 1 :]):
            break
        rest, truncated = rest[first_answer + 1 :], True
    ids, mask = enc.ids, enc.assistant_mask
    if len(ids) > window:
        truncated = True
        ids, mask = (ids[:window], mask[:window]) if any(mask[:window]) else (ids[-window:], mask[-window:])
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)], truncated


def encode_pair(tokenizer: Tokenizer, pair: dict, lengths: tuple[int, int]) -> dict:
    """Prompt (chat template, open assistant turn; its end kept) + each completion (its start kept, with
    <|im_end|>). Labels are -100 on the prompt, so only completion tokens enter the log-probs."""
    max_prompt, max_completion = lengths
    prompt = apply_chat_template(tokenizer, pair["prompt"], add_generation_prompt=True).ids
    truncated = len(prompt) > max_prompt
    prompt = prompt[-max_prompt:]
    out = {"truncated": truncated}
    for side in ("chosen", "rejected"):
        completion = tokenizer.encode(pair[side]) + [tokenizer.im_end_id]
        out["truncated"] = out["truncated"] or len(completion) > max_completion
        completion = completion[:max_completion]
        out[f"{side}_ids"] = prompt + completion
        out[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + completion
    return out


def _tokenize_pair(batch: dict, tokenizer: Tokenizer, lengths: tuple[int, int]) -> dict:
    keys = ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "truncated")
    out: dict[str, list] = {k: [] for k in (*keys, "length", "n_targets")}
    for text in batch["text"]:
        enc = encode_pair(tokenizer, json.loads(text), lengths)
        for k in keys:
            out[k].append(enc[k])
        out["length"].append(len(enc["chosen_ids"]) + len(enc["rejected_ids"]))
        out["n_targets"].append(sum(t != IGNORE_INDEX for t in enc["chosen_labels"] + enc["rejected_labels"]))
    return out


def _tokenize_prompt(batch: dict, tokenizer: Tokenizer, max_length: int) -> dict:
    """Chat template with an open assistant turn; the end of a too long prompt is kept."""
    out = {"prompt_ids": [], "truncated": [], "length": [], "n_targets": []}
    for text in batch["text"]:
        ids = apply_chat_template(tokenizer, json.loads(text)["prompt"], add_generation_prompt=True).ids
        out["truncated"].append(len(ids) > max_length)
        out["prompt_ids"].append(ids[-max_length:])
        out["length"].append(min(len(ids), max_length))
        out["n_targets"].append(0)
    return out


def _tokenize_chat(batch: dict, tokenizer: Tokenizer, window: int) -> dict:
    out = {"input_ids": [], "labels": [], "truncated": [], "length": [], "n_targets": []}
    for text in batch["text"]:
        ids, labels, truncated = encode_chat(tokenizer, json.loads(text), window)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["truncated"].append(truncated)
        out["length"].append(len(ids))
        out["n_targets"].append(sum(label != IGNORE_INDEX for label in labels[1:]))  # targets after the shift
    return out


def _pack_chat(batch: dict, window: int) -> dict:
    """Greedily put consecutive conversations into windows of at most `window` tokens; positions restart at 0
    for each one, so the model's block-diagonal mask keeps them apart."""
    out = {"input_ids": [], "labels": [], "position_ids": [], "truncated": [], "n_targets": []}
    current = {k: [] for k in out}

    def flush() -> None:
        if current["input_ids"]:
            for k in ("input_ids", "labels", "position_ids"):
                out[k].append(current[k])
            out["truncated"].append(any(current["truncated"]))
            out["n_targets"].append(sum(label != IGNORE_INDEX for label in current["labels"][1:]))
        for k in current:
            current[k] = []

    for ids, labels, truncated in zip(batch["input_ids"], batch["labels"], batch["truncated"]):
        if len(current["input_ids"]) + len(ids) > window:
            flush()
        current["input_ids"] += ids
        current["labels"] += labels
        current["position_ids"] += list(range(len(ids)))
        current["truncated"].append(truncated)
    flush()
    return out
