"""MiniLLMDataModule: resolve the data dir -> read and sample each source -> split -> tokenize -> pack -> load.

What is read and how it becomes batches is the data kind's (minillm/data/kinds.py: `pretrain`, `sft`,
`preference`, `prompts`, named after their folders); this module does what every kind shares. Records are read
by our own line parser (errors name file:line) into a Hugging Face `datasets.Dataset` built with
`from_generator`; tokenization and packing are `Dataset.map` calls, cached on disk under `data.cache_dir` and
reused by later runs. Every record (also unsampled and bad ones) leaves a row with its split, so
`dataset_stats.json` can be written from the cached table without reading the files again. The train loader is
resumable (minillm/data/loader.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from datasets import Dataset, disable_progress_bars, enable_progress_bars
from datasets.exceptions import DatasetGenerationError
from torch.utils.data import DataLoader

from minillm.config import DATA_DIR_ENV, DataConfig, SourceConfig, data_dir_from_env
from minillm.data.builtin import DEFAULT_OUT as BUILTIN_DIR
from minillm.data.builtin import build_builtin
from minillm.data.hf import HFSource, read_source, sources_of
from minillm.data.kinds import PRETRAIN, Kind, kind_named
from minillm.data.loader import ResumableLoader, ResumableSampler, WindowTotals
from minillm.data.stream import PretrainStream, StreamLoader
from minillm.data.records import BadRecords, DataError, is_held_out, is_sampled
from minillm.progress import shown as progress_shown
from minillm.tokenizer import EmptyCorpusError, Tokenizer, TokenizerConfig, get_tokenizer

log = logging.getLogger(__name__)
PIPELINE_VERSION = 1  # part of every cache fingerprint: bump when reading/tokenizing/packing changes
PACK_BATCH = 2000  # documents per packing batch; the tail of each batch that fills no window is dropped


def resolve_data_dir(config: DataConfig) -> Path:
    """data.dir when given, else $MINILLM_DATA_DIR (or $MINIGPT_DATA_DIR), else the built-in corpus (built on
    first use)."""
    from_env = data_dir_from_env()
    if config.dir:
        path, origin = Path(config.dir), "data.dir"
    elif from_env:
        path, origin = Path(from_env[0]), f"${from_env[1]}"
    else:
        return build_builtin(BUILTIN_DIR)
    if not path.is_dir():
        raise DataError(
            f"data dir {path} (from {origin}) does not exist; point {origin} at a folder laid out "
            "as <dir>/pretrain/*.jsonl|txt, <dir>/sft/*.jsonl, ... (docs/data.md)"
        )
    return path


def find_sources(config: DataConfig, kind: Kind) -> tuple[Path | None, list[Path | HFSource]]:
    """(data dir, sources) of a stage: the kind's files in the data dir, then the Hugging Face sources of
    `data.sources` for this kind. With Hugging Face sources and no data dir named (data.dir, $MINILLM_DATA_DIR),
    only they are read (not the built-in corpus); with a data dir, its files join them."""
    hf = sources_of(config, kind.name)
    if hf and not (config.dir or data_dir_from_env()):
        return None, list(hf)
    data_dir = resolve_data_dir(config)
    files = find_files(data_dir, kind, required=not hf)
    clash = sorted({f.stem for f in files} & {s.name for s in hf})
    if clash:
        raise DataError(
            f"data.sources.{clash[0]} is a Hugging Face dataset and a file of {data_dir / kind.name} is named "
            f"{clash[0]} too: give the dataset source another name"
        )
    return data_dir, [*files, *hf]


def find_files(data_dir: Path, kind: Kind, required: bool = True) -> list[Path]:
    """The files of a kind: <data_dir>/<kind.name>/ matching its patterns."""
    folder = data_dir / kind.name
    searched = [str(folder / p) for p in kind.patterns]
    files = sorted(f for p in kind.patterns for f in folder.glob(p) if f.is_file())
    others = sorted(f.name for f in folder.glob("*") if f.is_file() and f not in files and not f.name.startswith("."))
    if others:  # e.g. a .json beside .jsonl files: never skipped in silence
        log.warning(
            "%s: %s not read (a %s source is %s)", folder, ", ".join(others), kind.name, " or ".join(kind.patterns)
        )
    if not files and required:
        for s in searched:
            log.error("no data file matches %s", s)
        found = f" It holds {', '.join(others)}, which are not read: rename them." if others else ""
        raise DataError(
            f"no {kind.name} data in {data_dir}: looked for {', '.join(searched)}.{found} "
            f"Put files there or set data.dir / {DATA_DIR_ENV} to a data dir with a {kind.name}/ folder"
        )
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{f}: the file is empty; remove it or fill it")
    return files


def corpus_lines(files: list[Path | HFSource], bad: BadRecords, max_chars: int | None = None) -> Iterator[str]:
    """The non-blank lines of the pretraining records; with `max_chars`, the first max_chars / len(files)
    characters of each source (every source is represented in a sample)."""
    share = None if max_chars is None else max_chars // max(len(files), 1)
    for f in files:
        left = share
        for text in read_source(f, PRETRAIN, bad):
            if left is not None and left <= 0:
                break
            for line in text.split("\n"):
                if not line.strip():
                    continue
                if left is not None:
                    if left <= 0:
                        break
                    left -= len(line)
                yield line


def corpus_tokenizer(files: list[Path | HFSource], config: TokenizerConfig, streaming: bool = False) -> Tokenizer:
    """The tokenizer of these pretraining sources (cached by content and settings), trained on their records'
    lines (with `tokenizer.max_chars`, a sample of each source's start: for huge sets). Malformed records are
    skipped here (the data module reports them with file:line right after); when nothing is left, the error
    shows the first bad record. `streaming` (data.streaming): a tokenizer is only trained on a sample."""
    bad = BadRecords(skip=True)

    def lines() -> Iterator[str]:
        if streaming and config.max_chars is None:
            raise DataError(
                "data.streaming=true: training the tokenizer would read the whole stream; set tokenizer.max_chars "
                "(e.g. 50000000: a sample of each source's start), or start from a model with its tokenizer "
                "(init_from)"
            )
        return corpus_lines(files, bad, config.max_chars)

    try:
        return get_tokenizer(files, config, lines)
    except EmptyCorpusError:
        skipped = sum(bad.counts.values())
        why = f"all {skipped} records are bad, the first: {next(iter(bad.examples.values()))}" if skipped else ""
        raise EmptyCorpusError(
            f"no text to train the tokenizer on in {', '.join(map(str, files))}: "
            + (why or "every record is empty")
            + ". Fix the files (or point data.dir at the right folder)"
        ) from None


def _file_key(f: Path | HFSource) -> str:
    if isinstance(f, HFSource):
        return f.fingerprint()
    st = f.stat()
    return f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _rows(
    files: list[str],
    ratios: list[float],
    val_ratios: list[float],
    caps: list[int | None],
    skip_bad: bool,
    kind: str,
    key: str,
    offset: float = 0.0,
) -> Iterator[dict]:
    """Every record of every source as a row: source, text, split (train / val / unsampled / bad).

    A record is sampled by a hash of its text (ratio, from `offset`: `is_sampled`), the first `cap` sampled records
    of a file are kept, and the kept ones are split by another hash. Structured records are stored as their JSON text.
    `files` holds paths and dataset sources (their JSON spec); `key` (file sizes and mtimes, dataset
    fingerprints) only feeds the cache fingerprint.
    """
    del key
    for name, ratio, val_ratio, cap in zip(files, ratios, val_ratios, caps):
        path = HFSource.from_spec(name) if name.startswith("{") else Path(name)
        name = str(path)
        bad = BadRecords(skip_bad)
        kept = 0
        for text in read_source(path, kind_named(kind), bad):
            if not is_sampled(text, ratio, offset) or (cap is not None and kept >= cap):
                yield {"source": path.stem, "text": "", "split": "unsampled"}
                continue
            kept += 1
            yield {"source": path.stem, "text": text, "split": "val" if is_held_out(text, val_ratio) else "train"}
        for _ in range(bad.counts.get(name, 0)):
            yield {"source": path.stem, "text": bad.examples[name], "split": "bad"}


class MiniLLMDataModule(L.LightningDataModule):
    """The datasets and loaders of one data kind for one stage."""

    def __init__(
        self,
        config: DataConfig,
        files: list[Path | HFSource],
        tokenizer: Tokenizer,
        block_size: int,
        seed: int,
        kind: Kind = PRETRAIN,
        accumulate: int = 1,
        lengths: tuple[int, int] = (128, 128),
    ):
        """`lengths`: (prompt, completion) tokens kept per record, for the kinds with prompts."""
        super().__init__()
        self.lengths = tuple(lengths)
        kind.check(block_size, self.lengths)
        self.config, self.files, self.tokenizer = config, files, tokenizer
        self.block_size, self.seed, self.kind, self.accumulate = block_size, seed, kind, accumulate
        self.train: Dataset | None = None
        self.val: Dataset | None = None
        self.stats: dict = {}
        left_out = {name for name, src in config.sources.items() if src.sample_ratio == 0}  # absent is fine then
        datasets = {name for name, src in config.sources.items() if src.hf is not None}  # maybe another kind's
        unknown = sorted(set(config.sources) - {f.stem for f in files} - left_out - datasets)
        if unknown:
            raise DataError(f"data.sources names {unknown}, but the data files are {[f.stem for f in files]}")

    def _source(self, f: Path) -> SourceConfig:
        src = self.config.sources.get(f.stem, SourceConfig())
        return src if isinstance(src, SourceConfig) else SourceConfig(**src)

    # ---- building the datasets ----
    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        if progress_shown():  # datasets' tokenize / pack bars on a terminal, none in logs
            enable_progress_bars()
        else:
            disable_progress_bars()
        if self.config.streaming:
            self._setup_stream()
            return
        cache = Path(self.config.cache_dir)
        sources = [self._source(f) for f in self.files]
        kwargs = {
            "files": [f.spec() if isinstance(f, HFSource) else str(f) for f in self.files],
            "ratios": [s.sample_ratio * self.config.sample_ratio for s in sources],
            "val_ratios": [self.config.val_ratio if s.val_ratio is None else s.val_ratio for s in sources],
            "caps": [s.max_samples for s in sources],
            "skip_bad": self.config.skip_bad_records,
            "offset": self.config.sample_offset,
            "kind": self.kind.name,
            "key": json.dumps([PIPELINE_VERSION] + [_file_key(f) for f in self.files]),
        }
        try:
            rows = Dataset.from_generator(_rows, gen_kwargs=kwargs, cache_dir=str(cache / "records"))
        except DatasetGenerationError as e:  # datasets wraps what the reader raised: show ours as it is
            cause = e.__cause__ or e.__context__
            if isinstance(cause, DataError):
                raise cause from None
            names = ", ".join(str(f) for f in self.files)
            raise DataError(  # e.g. files of blank lines only: nothing to build a dataset from
                f"no {self.kind.name} records could be read from {names} ({type(cause or e).__name__}: "
                f"{str(cause or e).splitlines()[0][:200]}); each file needs one record per line (docs/data.md)"
            ) from None
        splits = Counter(rows["split"])
        if splits["train"] == 0:
            raise DataError(
                f"no training records in {', '.join(f.name for f in self.files)}: of {sum(splits.values())} records, "
                f"{splits['bad']} are bad (skipped), {splits['unsampled']} are left out by sampling "
                f"(data.sample_ratio, data.sources.<name>.sample_ratio / max_samples), {splits['val']} are held out "
                "for validation. Raise the sampling ratios or caps, lower data.val_ratio (or a source's val_ratio) "
                "when most records are held out, fix the bad records, or add data"
            )
        packing = self.kind.packs(self.config.packing)
        fingerprint = hashlib.sha256(
            f"{rows._fingerprint}|{self.tokenizer.sha256}|{self.block_size}|{packing}|{self.lengths}|"
            f"{PIPELINE_VERSION}".encode()
        ).hexdigest()[:32]
        tokenized = rows.filter(
            lambda s: s in ("train", "val"), input_columns="split", new_fingerprint=f"sel-{fingerprint}"
        )
        window = self.block_size + 1
        tokenized = tokenized.map(
            self.kind.tokenize,
            batched=True,
            fn_kwargs={"tokenizer": self.tokenizer, "window": window, "lengths": self.lengths},
            num_proc=self._num_proc(len(tokenized)),
            new_fingerprint=f"tok-{fingerprint}",
            desc="tokenize",
        )
        packed = {}
        for split in ("train", "val"):
            part = tokenized.filter(
                lambda s, want=split: s == want, input_columns="split", new_fingerprint=f"{split}-{fingerprint}"
            )
            if packing:
                part = part.map(
                    self.kind.pack,
                    batched=True,
                    batch_size=PACK_BATCH,
                    remove_columns=part.column_names,
                    fn_kwargs={"window": window, "eos": self.tokenizer.eos_id},
                    new_fingerprint=f"pack-{split}-{fingerprint}",
                    desc=f"pack {split}",
                )
            packed[split] = part.with_format("torch")
        self.train, self.val = packed["train"], packed["val"]
        self.stats = self._stats(rows, tokenized, sources)
        if len(self.train) < self.config.batch_size:
            raise DataError(
                f"the training split has {len(self.train)} rows (of up to {window} tokens), fewer than one batch "
                f"(data.batch_size={self.config.batch_size}) after sampling and holding out {len(self.val)} rows for "
                "validation; add data, raise data.sample_ratio, lower data.val_ratio (or a source's val_ratio), or "
                "lower data.batch_size / model.block_size"
            )

    def _setup_stream(self) -> None:
        """data.streaming: the training windows come from a PretrainStream, validation from its start."""
        if self.kind is not PRETRAIN:
            raise DataError(
                f"data.streaming=true streams pretraining sources; the {self.kind.name} stage reads its records "
                "whole (they are small): set data.streaming=false"
            )
        if self.config.num_workers:
            raise DataError("data.streaming=true reads the stream in the training process: set data.num_workers=0")
        sources = [self._source(f) for f in self.files]
        self.train = PretrainStream(
            self.files,
            ratios=[s.sample_ratio * self.config.sample_ratio for s in sources],
            val_ratios=[self.config.val_ratio if s.val_ratio is None else s.val_ratio for s in sources],
            caps=[s.max_samples for s in sources],
            skip_bad=self.config.skip_bad_records,
            offset=self.config.sample_offset,
            tokenizer=self.tokenizer,
            window=self.block_size + 1,
            seed=self.seed,
            batch_size=self.config.batch_size,
        )
        self.val = self.train.val_windows() if any(self.train.val_ratios) else []
        per = {f.stem: {"file": str(f), "config": asdict(s)} for f, s in zip(self.files, sources)}
        self.stats = {
            "kind": self.kind.name,
            "streaming": True,  # nothing counted ahead: the stream is read as it trains
            "sources": per,
            "block_size": self.block_size,
            "val_rows": len(self.val),
            "tokenizer_sha256": self.tokenizer.sha256,
        }

    def _num_proc(self, n: int) -> int | None:
        return self.config.num_proc if self.config.num_proc > 1 and n >= 1000 else None

    def _stats(self, rows: Dataset, tokenized: Dataset, sources: list[SourceConfig]) -> dict:
        per: dict[str, dict] = {}
        for f, src in zip(self.files, sources):
            per[f.stem] = {
                "file": str(f),
                "raw_records": 0,
                "bad_records": 0,
                "sampled_records": 0,
                "train_records": 0,
                "val_records": 0,
                "train_tokens": 0,
                "val_tokens": 0,
                "config": asdict(src),
            }
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
            per[source][f"{split}_tokens"] += self.kind.tokens_per_record(n)
        if self.kind.targets:
            for s in per.values():
                s.update(train_assistant_tokens=0, truncated=0)  # completion tokens for pairs
            columns = (tokenized["source"], tokenized["split"], tokenized["n_targets"], tokenized["truncated"])
            for source, split, n, cut in zip(*columns):
                per[source]["train_assistant_tokens"] += n if split == "train" else 0
                per[source]["truncated"] += int(cut)
        for name, s in per.items():
            s["val_ratio"] = s["val_records"] / max(s["sampled_records"], 1)
            if s["train_records"] == 0:
                log.warning("data source %s contributes no training records (%s)", name, s["file"])
            if s["bad_records"]:
                log.warning("data source %s: skipped %d bad records", name, s["bad_records"])
        total = sum(s["train_tokens"] for s in per.values())
        return {
            "kind": self.kind.name,
            "sources": per,
            "block_size": self.block_size,
            "train_rows": len(self.train),
            "val_rows": len(self.val),
            "train_tokens": total,
            "packing_efficiency": self.kind.packing_efficiency(
                len(self.train), total, self.block_size, self.config.packing
            ),
            "tokenizer_sha256": self.tokenizer.sha256,
        }

    def write_stats(self, path: Path) -> None:
        path.write_text(json.dumps(self.stats, indent=2, ensure_ascii=False), encoding="utf-8")

    # ---- loaders ----
    def collate(self, rows: list[dict]) -> dict:
        return self.kind.collate(rows, self.tokenizer)

    def train_dataloader(self) -> ResumableLoader | StreamLoader:
        if isinstance(self.train, PretrainStream):
            return StreamLoader(self.train, self.config.batch_size)
        collate = self.collate if self.kind.collates() else None
        if not self.kind.weighted:
            sampler = ResumableSampler(len(self.train), self.config.batch_size, self.seed)
            return ResumableLoader(self.train, sampler, num_workers=self.config.num_workers, collate_fn=collate)
        weights = self.train.with_format("torch")["n_targets"]
        sampler = ResumableSampler(
            len(self.train), self.config.batch_size, self.seed, weights=weights, accumulate=self.accumulate
        )
        return ResumableLoader(
            WindowTotals(self.train), sampler, num_workers=self.config.num_workers, collate_fn=collate
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None or len(self.val) == 0:
            return []
        return DataLoader(
            self.val,
            batch_size=self.config.batch_size,
            shuffle=False,
            num_workers=self.config.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=self.collate if self.kind.collates() else None,
        )
