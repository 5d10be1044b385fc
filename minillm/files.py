"""File helpers with no heavy imports (the corpus builder and the run dir use them as well as checkpoints)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (weights, downloaded archives)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """`text` into `path` through `<name>.<pid>.tmp` beside it and a rename: a reader sees the old file or the new
    one, never half of one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


INDEX_FILE = "model.safetensors.index.json"  # a sharded model folder: which shard holds each tensor


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: model.safetensors, or the shards its index names (in order);
    [] when it has neither. A shard the index names but the folder lacks is an error naming it."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if not (folder / INDEX_FILE).is_file():
        return []
    try:
        weight_map = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        shards = [folder / name for name in sorted(set(weight_map.values()))]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        index = folder / INDEX_FILE
        raise ValueError(f"{index} is not a safetensors index (a weight_map of tensor -> file): {e}") from None
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder / INDEX_FILE} names shards that are not in {folder}: {missing}")
    return shards
