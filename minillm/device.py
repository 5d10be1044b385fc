"""python -m minillm.device — which accelerator training would use, and proof the run dir is writable."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from minillm.config import compose, resolved_dict
from minillm.rundir import write_snapshot


def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def main(argv: list[str]) -> None:
    cfg = compose(argv)
    device = best_device()
    detail = f" ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} visible)" if device == "cuda" else ""
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported() or device == "cpu"
    print(f"device: {device}{detail}; torch {torch.__version__}; bf16-mixed {'available' if bf16 else 'unavailable'}")
    config = resolved_dict(cfg)
    path = write_snapshot(Path(config["run_dir"]), config, device)
    print(f"config snapshot written to {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
