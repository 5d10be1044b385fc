"""`minillm data` (or `python -m minillm.data`): build the built-in corpus into data/builtin (minillm/data/builtin.py)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from minillm.cli import Command
from minillm.data.builtin import DEFAULT_CACHE, DEFAULT_OUT, BuiltinDataError, build_builtin


@dataclass
class DataCommand:
    """`minillm data` (conf/data.yaml): build the built-in corpus."""

    out: str = str(DEFAULT_OUT)
    cache: str = str(DEFAULT_CACHE)  # where downloaded archives are kept
    force: bool = False  # rebuild even when the manifest is current


def run(command: DataCommand) -> None:
    try:
        out = build_builtin(Path(command.out), Path(command.cache), command.force)
    except BuiltinDataError as e:
        sys.exit(f"error: {e}")
    manifest = json.loads((out / "manifest.json").read_text())
    for rel, stats in manifest["files"].items():
        print(f"{out / rel}: {stats['records']:,} records, {stats['chars']:,} chars")


COMMAND = Command("data", DataCommand, run)
cli, main = COMMAND.cli, COMMAND.main  # main(argv): the same command from Python


if __name__ == "__main__":
    cli()
