"""Start-up: the wall time of `minillm <command> --help` for every command, of a typo (an unknown key), and of
importing each command's module, each in a fresh process (median of --repeats), beside a bare `python -c pass`
and `import torch` / `import lightning` measured the same way. Also which of torch and Lightning each import loads.

    python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import print_table, write
from minillm.cli import COMMANDS


def wall(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loads(module: str) -> str:
    probe = f"import sys, {module}; print(' '.join(m for m in ('torch', 'lightning') if m in sys.modules) or '-')"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out-dir", default="outputs/bench")
    args = parser.parse_args(argv)
    py, cli = sys.executable, [sys.executable, "-m", "minillm.cli"]
    rows = [
        {"what": "python -c pass", "s": wall([py, "-c", "pass"], args.repeats), "loads": "-"},
        {"what": "import torch", "s": wall([py, "-c", "import torch"], args.repeats), "loads": "torch"},
        {
            "what": "import lightning",
            "s": wall([py, "-c", "import lightning"], args.repeats),
            "loads": loads("lightning"),
        },
    ]
    for name, (module, _) in COMMANDS.items():
        rows.append({"what": f"minillm {name} --help", "s": wall([*cli, name, "--help"], args.repeats), "loads": "-"})
        rows.append({"what": f"minillm {name} no_such_key=1", "s": wall([*cli, name, "no_such_key=1"], args.repeats)})
        rows.append(
            {
                "what": f"import {module}",
                "s": wall([py, "-c", f"import {module}"], args.repeats),
                "loads": loads(module),
            }
        )
    print_table(rows, ["what", "s", "loads"])
    payload = {"repeats": args.repeats, "rows": rows}
    write("startup", payload, Path(args.out_dir))
    return payload


if __name__ == "__main__":
    main()
