"""minillm sweep summarize [DIR]  (or `minillm sweep dir=DIR`; python -m minillm.sweep)

Rebuilds the summary of a Hydra multirun from its jobs' files (minillm/sweeps.py): summary.csv, summary.md and
summary.png in the sweep dir, and prints the table. Works while the sweep runs and after a crash. Without a dir: the
newest sweep under outputs/sweeps/.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from minillm.cli import Command


@dataclass
class SweepCommand:
    """`minillm sweep` (conf/sweep.yaml)."""

    dir: Optional[str] = None  # a sweep dir (outputs/sweeps/<name>/<time>); None: the newest under outputs/sweeps
    sweeps: str = "outputs/sweeps"  # where to look for the newest


def newest_sweep(root: Path) -> Path | None:
    from minillm.sweeps import JOB_FILE

    dirs = {p.parent.parent for p in root.glob(f"**/{JOB_FILE}")}
    return max(dirs, key=lambda d: d.stat().st_mtime, default=None)


def run(command: SweepCommand) -> list[dict]:
    from minillm.sweeps import markdown, write_summary

    folder = Path(command.dir) if command.dir else newest_sweep(Path(command.sweeps))
    if folder is None:
        raise SystemExit(f"error: no sweep under {command.sweeps}: pass dir=<a sweep dir>")
    if not folder.is_dir():
        raise SystemExit(f"error: {folder} is not a folder: pass dir=<a sweep dir> (outputs/sweeps/<name>/<time>)")
    rows, written = write_summary(folder)
    if not rows:
        raise SystemExit(f"error: {folder} holds no sweep jobs (no */job.json): is it a sweep dir of minillm -m?")
    print(markdown(rows, folder))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return rows


COMMAND = Command("sweep", SweepCommand, run)
main = COMMAND.main  # main(argv): the same command from Python


def cli() -> None:
    """`minillm sweep summarize DIR` is `minillm sweep dir=DIR` (the verb is optional)."""
    args = sys.argv[1:]
    if args and args[0] == "summarize":
        args = args[1:]
    if args and "=" not in args[0] and not args[0].startswith("-"):
        args = [f"dir={args[0]}", *args[1:]]
    sys.argv = [sys.argv[0], *args]
    COMMAND.cli()


if __name__ == "__main__":
    cli()
