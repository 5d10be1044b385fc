"""minillm device [train overrides] — which accelerator training would use, and proof the run dir is writable."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from minillm.accelerator import best_device, cpu_has_fast_bf16
from minillm.cli import Command
from minillm.config import resolved_dict
from minillm.rundir import write_snapshot


def run(cfg: DictConfig) -> None:
    import torch

    device = best_device()
    detail = f" ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} visible)" if device == "cuda" else ""
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported() or device == "cpu" and cpu_has_fast_bf16()
    print(f"device: {device}{detail}; torch {torch.__version__}; bf16-mixed {'available' if bf16 else 'unavailable'}")
    config = resolved_dict(cfg)
    path = write_snapshot(Path(config["run_dir"]), config, device)
    print(f"config snapshot written to {path}")


COMMAND = Command("device", None, run)  # conf/device.yaml: the train config
cli, main = COMMAND.cli, COMMAND.main  # main(argv): the same command from Python


if __name__ == "__main__":
    cli()
