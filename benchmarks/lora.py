"""LoRA SFT against full SFT from the same pretrained weights, side by side in one run: trainable parameters,
checkpoint size, training tokens/s and held-out SFT loss after the same steps.

    python -m benchmarks.lora --init outputs/pretrain_small/final [--preset small] [--steps 200] [--r 8]

`--init`: the pretrained final/ both runs start from (its preset is `--preset`); without it a random init of
the preset's shape is used (throughput and sizes only: a held-out loss from random weights says nothing about
LoRA). Both runs are `python -m minillm.train stage=sft` with the same data, seed, batch and schedule; LoRA
trains at `--lora-lr` (adapters want a larger rate than full fine-tuning), full SFT at `--lr`. Tokens/s is the
median over steps after `--warmup`; the held-out loss is the final validation of each run (data.val_ratio split).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

from benchmarks.common import median_rate, print_table, write
from benchmarks.train_throughput import StepTimer, overrides, tokens_of
from minillm.model import MiniGPT
from minillm.pretrained import save_pretrained
from minillm.train import build


def one_run(args: list, warmup: int) -> dict:
    run = build(args)
    timer = StepTimer()
    run.trainer.callbacks.append(timer)
    tokens = tokens_of(next(iter(run.datamodule.train_dataloader())))
    run.fit()
    times = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    ckpt = Path(run.run_dir) / "checkpoints" / "last.ckpt"
    module = run.module
    return {
        "trainable params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "all params": sum(p.numel() for p in module.parameters()),
        "checkpoint MB": ckpt.stat().st_size / 2**20,
        "tok/s": median_rate(times[warmup:] or times, tokens),
        "held-out loss": float(run.trainer.callback_metrics["val/loss"]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--init", default=None, help="pretrained final/ of --preset (default: random weights)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--val-batches", type=int, default=20)
    parser.add_argument("--override", nargs="*", default=[], help="more train overrides (data.dir=..., model.*)")
    parser.add_argument("--out-dir", default="outputs/bench")
    args = parser.parse_args(argv)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    validation = [
        f"trainer.val_check_interval={args.steps}",
        f"trainer.limit_val_batches={args.val_batches}",
        "callbacks.task_eval=null",
        *args.override,
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        init = args.init
        if init is None:
            probe = build(
                overrides(args.preset, "pretrain", "32-true", 1, tmp / "probe", None, args.override), inspect=True
            )
            torch.manual_seed(0)
            init = save_pretrained(MiniGPT(probe.module.model.config), probe.datamodule.tokenizer, tmp / "init")
        for mode, extra in (
            ("full", [f"optim.lr={args.lr}"]),
            (
                f"LoRA r={args.r}",
                [f"model.lora.r={args.r}", f"model.lora.alpha={2 * args.r}", f"optim.lr={args.lora_lr}"],
            ),
        ):
            run_args = overrides(args.preset, "sft", args.precision, args.steps, tmp / mode[:4], init, extra)
            run_args = [a for a in run_args if not a.startswith(("trainer.val_check_interval", "trainer.limit_val"))]
            rows.append({"mode": mode, **one_run(run_args + validation, args.warmup)})
            print_table(rows[-1:], list(rows[-1]))
    full, adapted = rows
    ratios = {
        "trainable": adapted["trainable params"] / full["trainable params"],
        "checkpoint": adapted["checkpoint MB"] / full["checkpoint MB"],
        "tok/s": adapted["tok/s"] / full["tok/s"],
    }
    print()
    print_table(rows, list(rows[0]))
    print("LoRA / full: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    payload = {"preset": args.preset, "init": str(args.init), "steps": args.steps, "rows": rows, "ratios": ratios}
    write("lora", payload, Path(args.out_dir))
    return payload


if __name__ == "__main__":
    main()
