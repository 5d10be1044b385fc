"""Wall time of each stage of `make demo`, run from a scratch working directory (the built-in corpus is linked
in, so only training is timed).

    python benchmarks/end_to_end.py [--max-steps N]    # N caps every stage (a quick smoke); default: the demo's
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table, write

# The training stages of the Makefile's demo target, in order.
STAGES = [
    ("pretrain", ["stage=pretrain", "experiment=demo"]),
    ("sft", ["stage=sft", "experiment=demo_sft"]),
    ("dpo", ["stage=dpo", "experiment=demo_dpo"]),
    ("reward", ["stage=reward", "experiment=demo_reward"]),
    ("rlhf", ["stage=rlhf", "experiment=demo_rlhf"]),
]


def steps_trained(run_dir: Path) -> int | None:
    """Optimizer steps the run logged (logs/metrics.csv numbers them from 0), None when it logged none."""
    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return None
    steps = [int(row["step"]) for row in csv.DictReader(path.open()) if row.get("step")]
    return max(steps) + 1 if steps else None


def final_ok(run_dir: Path) -> bool:
    """The stage exported its model (final/ with weights and minillm.json)."""
    return (run_dir / "final" / "model.safetensors").is_file() and (run_dir / "final" / "minillm.json").is_file()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--override", nargs="*", default=[], help="more train overrides for every stage")
    parser.add_argument("--out-dir", default="outputs/bench")
    args = parser.parse_args(argv)
    data = Path(args.data_dir).resolve()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(data, Path(tmp) / "data")
        for name, stage in STAGES:
            cmd = [
                sys.executable,
                "-m",
                "minillm.train",
                *stage,
                f"model={args.model}",
                "trainer.enable_progress_bar=false",
            ]
            cmd += args.override
            if args.max_steps:
                cmd += [
                    f"trainer.max_steps={args.max_steps}",
                    f"trainer.val_check_interval={args.max_steps}",
                    "trainer.limit_val_batches=2",
                ]
            start = time.perf_counter()
            done = subprocess.run(
                cmd,
                cwd=tmp,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            )
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"stage {name} failed:\n{(done.stdout + done.stderr)[-3000:]}")
            run_dir = Path(tmp) / "outputs" / f"{name}_{args.model}"
            rows.append(
                {"stage": name, "seconds": seconds, "steps": steps_trained(run_dir), "final": final_ok(run_dir)}
            )
    rows.append({"stage": "total", "seconds": sum(r["seconds"] for r in rows)})
    print_table(rows, ["stage", "seconds", "steps"])
    payload = {"model": args.model, "max_steps": args.max_steps, "rows": rows}
    write("end_to_end", payload, Path(args.out_dir))
    return payload


if __name__ == "__main__":
    main()
