"""Crash-safe checkpoint files: write `<name>.<pid>.tmp` in the checkpoint's own folder, fsync it, `os.replace` it onto
`<name>`, fsync the folder. A kill at any byte leaves the previous complete file (or none) — never a truncated
`<name>.ckpt` for `resume=auto` to pick — and a failed write (disk full) removes its `.tmp` and raises, leaving
every existing checkpoint as it was. `remove_stale_tmp` clears the `.tmp` files a killed run left behind.
(Lightning's own writer moves a temporary file from elsewhere: a copy across filesystems, without fsync.)

Fault injection for tests: MINILLM_FAULT_KILL_AFTER_BYTES=N makes the writer SIGKILL its own process once N
bytes of checkpoint data have been written by this process (counted across checkpoints).
"""

from __future__ import annotations

import io
import logging
import os
import signal
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from minillm.files import fsync_dir

log = logging.getLogger(__name__)
KILL_ENV = "MINILLM_FAULT_KILL_AFTER_BYTES"
CHUNK = 1 << 20


class AtomicCheckpointIO(TorchCheckpointIO):
    written = 0  # bytes written by this process (for fault injection)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction is the right tool there
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # unique per process
        try:
            with open(tmp, "wb") as f:
                self._write(f, buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)

    @classmethod
    def _write(cls, f, data: memoryview) -> None:
        kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
        for start in range(0, len(data), CHUNK):
            chunk = data[start : start + CHUNK]
            if kill_after and cls.written + len(chunk) >= kill_after:  # fault injection: die mid-file
                f.write(chunk[: kill_after - cls.written])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            f.write(chunk)
            cls.written += len(chunk)


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Delete the `.tmp` files an interrupted save left in `folder`; returns them."""
    stale = sorted(Path(folder).glob("*.tmp")) if Path(folder).is_dir() else []
    for tmp in stale:
        log.warning("removing %s: a checkpoint write that never finished (the process was killed)", tmp)
        tmp.unlink(missing_ok=True)
    return stale
