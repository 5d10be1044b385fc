"""Hugging Face `datasets` sources: `data.sources.<name>.hf` names a dataset `datasets.load_dataset` (or
`load_from_disk`) opens, read row by row into the same records as our own files:

    hf: roneneldan/TinyStories            a hub id (subset, revision, split); offline: from the local HF cache
    hf: parquet / csv / json / arrow      a builder, with data_files: a path, a list, or {split: paths}
    hf: /path/to/folder_or_file           a save_to_disk folder, one data file (its suffix picks the builder),
                                          or a folder of data files

`columns` maps our field names to the dataset's columns (`{text: story}`, `{messages: dialog}`,
`{prompt: question, chosen: good, rejected: bad}`); the row is then read by the kind's own record parser
(minillm/data/records.py), so every chat and preference format of our files is accepted here too. A row the
parser refuses is a `DataError` naming the dataset, split and row index (or, with data.skip_bad_records, skipped
and counted); a mapped column the dataset lacks is an error listing its columns, before anything is read.
With data.streaming the dataset is opened as a stream (`streaming=True`; a save_to_disk folder through
`to_iterable_dataset`) and read by minillm/data/stream.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from minillm.config import SourceConfig
from minillm.data.records import BadRecords, DataError

BUILDERS = ("parquet", "csv", "json", "arrow", "text")
SUFFIX_BUILDER = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}
_OPENED: dict[str, object] = {}  # spec -> Dataset: one load per process (the tokenizer and the data module share)


@dataclass(frozen=True)
class HFSource:
    """A dataset source, named like a file source (`stem`) so sampling, stats and splits treat both alike."""

    name: str
    config: SourceConfig
    streaming: bool = False  # opened as an IterableDataset (data.streaming)

    @property
    def stem(self) -> str:
        return self.name

    def __str__(self) -> str:
        c = self.config
        extra = "".join(f", {k} {v}" for k, v in (("subset", c.subset), ("revision", c.revision)) if v)
        return f"dataset {c.hf} (split {c.split}{extra})"

    def spec(self) -> str:
        """The whole source as text (picklable, part of cache fingerprints)."""
        return json.dumps(
            {"name": self.name, "config": asdict(self.config), "streaming": self.streaming}, sort_keys=True
        )

    @classmethod
    def from_spec(cls, spec: str) -> HFSource:
        data = json.loads(spec)
        return cls(data["name"], SourceConfig(**data["config"]), data.get("streaming", False))

    def open(self):
        """The `datasets.Dataset` (loaded once per process); errors say what was asked for and what to do."""
        key = self.spec()
        if key not in _OPENED:
            _OPENED[key] = load_parts(self)
        return _OPENED[key]

    def fingerprint(self) -> str:
        """Of the data a source reads (what it is and how its columns map; not how it is sampled): the dataset's
        own fingerprint; a stream has none, so a local path's size and mtime stand in (a hub stream: pin its
        `revision`)."""
        c = self.config
        what = json.dumps([c.hf, c.subset, c.split, c.revision, c.data_files, c.columns], sort_keys=True)
        if not self.streaming:
            return f"{self.open()._fingerprint}:{what}"
        local = Path(c.hf).expanduser()
        paths = [local] if local.exists() else [Path(p) for p in _paths(c.data_files)]
        stamps = [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths if p.is_file()]
        return f"{what}:{stamps}"

    def rows(self) -> Iterator[tuple[int, dict]]:
        """(row index, row with the mapped columns under our field names)."""
        dataset = self.open()
        mapping = dict(self.config.columns)
        for i, row in enumerate(dataset):
            for ours, theirs in mapping.items():
                row[ours] = row.pop(theirs)
            yield i, row

    def read(self, kind, bad: BadRecords) -> Iterator[str]:
        """The records of `kind` (a data kind of minillm/data/kinds.py), as its files' reader yields them."""
        for i, row in self.rows():
            record = kind.normalise(_plain(row))
            if isinstance(record, str):
                bad(self, i, record)
                continue
            text = kind.record_text(record)
            if text:
                yield text


def _paths(data_files) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [p for v in data_files.values() for p in _paths(v)]
    return [str(p) for p in data_files]


def _plain(value):
    """Rows hold numpy/arrow scalars and tuples in places: plain JSON-able Python values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def sources_of(config, kind_name: str) -> list[HFSource]:
    """The Hugging Face sources of `data.sources` that feed a stage reading `kind_name` (and are sampled)."""
    return [
        HFSource(name, src, config.streaming)
        for name, src in sorted(config.sources.items())  # by name: the order on the command line changes nothing
        if src.hf is not None and src.kind in (None, kind_name) and src.sample_ratio > 0
    ]


def _offline() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_HUB_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")


def local_files(source: HFSource) -> list[Path]:
    """The local data files a source names (its `hf` path, or its `data_files` with globs expanded), each checked:
    a pattern that matches nothing, an empty or unreadable parquet file is an error naming it."""
    import glob

    c, where = source.config, f"data.sources.{source.name}"
    local = Path(c.hf).expanduser()
    if local.is_file():
        files = [local]
    elif c.hf in BUILDERS:
        files = []
        for pattern in _paths(c.data_files):
            matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
            if not matched:
                raise DataError(f"{where}.data_files: {pattern} matches no file; check the path or the pattern")
            files += [Path(m) for m in matched]
    else:
        return []
    for path in files:
        if path.suffix == ".parquet" or c.hf == "parquet":
            import pyarrow.parquet as pq

            try:
                rows = pq.ParquetFile(path).metadata.num_rows
            except Exception as e:  # truncated, not parquet at all
                raise DataError(f"{where}: {path} is not a readable parquet file ({e}); replace or remove it") from None
            if rows == 0:
                raise DataError(f"{where}: {path} has no rows (an empty split); remove it or fill it")
    return files


def load_parts(source: HFSource):
    import datasets

    c, where = source.config, f"data.sources.{source.name}"
    local = Path(c.hf).expanduser()
    stream = {"streaming": True} if source.streaming else {}
    local_files(source)  # named errors for what datasets would report vaguely
    try:
        if local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()):
            dataset = datasets.load_from_disk(str(local))
            if isinstance(dataset, datasets.DatasetDict):
                if c.split not in dataset:
                    raise DataError(f"{where}: {local} has splits {sorted(dataset)}, not {c.split!r}; set split=")
                dataset = dataset[c.split]
            dataset = dataset.to_iterable_dataset() if source.streaming else dataset
        elif local.is_file():
            builder = SUFFIX_BUILDER.get(local.suffix)
            if builder is None:
                raise DataError(f"{where}: {local}: unknown data file type; use {', '.join(SUFFIX_BUILDER)}")
            dataset = datasets.load_dataset(builder, data_files={c.split: str(local)}, split=c.split, **stream)
        elif c.hf in BUILDERS:
            if c.data_files is None:
                raise DataError(f"{where}: hf={c.hf} reads local files: set data_files (a path, a list or a dict)")
            dataset = datasets.load_dataset(c.hf, data_files=c.data_files, split=c.split, **stream)
        elif local.is_dir() or c.hf.startswith((".", "/", "~")):
            if not local.is_dir():
                raise DataError(f"{where}: no dataset at {local}: the path does not exist")
            dataset = datasets.load_dataset(str(local), data_files=c.data_files, split=c.split, **stream)
        else:
            dataset = datasets.load_dataset(c.hf, name=c.subset, split=c.split, revision=c.revision, **stream)
    except DataError:
        raise
    except Exception as e:  # unknown id, no network, no such split: datasets' own message, with what was asked
        hint = (
            " (offline: HF_DATASETS_OFFLINE is set, so only a dataset already in the local HF cache can be opened)"
            if _offline()
            else ""
        )
        raise DataError(f"{where}: could not open {source}{hint}: {type(e).__name__}: {e}") from None
    if source.streaming:
        columns = dataset.column_names or list(next(iter(dataset), {}))  # a stream may only know its first row
    else:
        if len(dataset) == 0:
            raise DataError(f"{where}: {source} is empty")
        columns = dataset.column_names
    missing = sorted(theirs for theirs in c.columns.values() if theirs not in columns)
    if missing:
        raise DataError(f"{where}.columns maps to {missing}, which {source} does not have; its columns are {columns}")
    return dataset


def read_source(source: Path | HFSource, kind, bad: BadRecords) -> Iterator[str]:
    """The records of a file or a dataset source, as the kind (minillm/data/kinds.py) stores them."""
    return source.read(kind, bad) if isinstance(source, HFSource) else kind.read(source, bad)
