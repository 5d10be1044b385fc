"""Progress of long work outside the training loop (corpus build, tokenizing, pairs, eval, report, export, batched
generation): a tqdm bar on a terminal, nothing when stderr is not one, so CI logs and pipes stay short. Training
shows Lightning's own bar."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def shown() -> bool:
    """Whether progress is drawn: stderr is a terminal."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """`iterable`, with a bar named `desc` while it is consumed (a plain iterator when progress is not shown)."""
    if not shown():
        return iterable
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)


def batch_starts(n: int, batch_size: int, desc: str) -> Iterable[int]:
    """0, batch_size, 2 * batch_size, ... below n, counted in batches under `desc`."""
    return progress(range(0, n, batch_size), desc, total=-(-n // batch_size), unit="batch")


def phase(message: str) -> None:
    """One line naming the phase a command enters (on a terminal; stderr, so stdout stays the command's output)."""
    if shown():
        print(message, file=sys.stderr, flush=True)
