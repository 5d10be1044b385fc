"""Training throughput and MFU per preset, stage, precision, eager/compiled and activation checkpointing;
Lightning's overhead against a bare loop.

    python benchmarks/train_throughput.py [--presets tiny small] [--stages pretrain sft dpo] [--steps 20]
        [--compile off on] [--checkpointing off on] [--device cpu|cuda]

MFU = FLOPs per token (minillm/flops.py: 6 × matmul parameters + 6 × layers × T × C) × tokens/s / the matmul
peak measured here, on the device that trains, for the run's dtype. Each configuration runs twice over the same
stage module and data: `Trainer.fit` as `python -m minillm.train` builds it (our callbacks and loggers included,
no validation) and a bare PyTorch loop (forward, backward, clip, AdamW step). Step times are medians after
`--warmup` steps (compilation happens in those). "saved MB" is what autograd keeps for the backward in one
training step of the bare loop (what activation checkpointing trades for recomputation), "peak MB" the CUDA
allocator's peak (GPU only).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch

from benchmarks.common import flops_per_token, measure_peak, median_rate, print_table, write
from minillm.accelerator import best_device, cpu_has_fast_bf16
from minillm.model import MiniGPT, ModelConfig
from minillm.pretrained import save_pretrained
from minillm.train import build


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())


def tokens_of(batch: dict) -> int:
    if "chosen_ids" in batch:
        return int(batch["chosen_ids"].numel() + batch["rejected_ids"].numel())
    return int(batch["input_ids"][:, :-1].numel())


def overrides(preset: str, stage: str, precision: str, steps: int, root: Path, init: Path | None, extra) -> list:
    """Train overrides of one configuration (`extra`: the device, compile and checkpointing switches, then the
    user's)."""
    out = [
        f"stage={stage}",
        f"model={preset}",
        f"trainer.precision={precision}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps + 1}",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"callbacks.checkpoint.every_n_train_steps={steps + 1}",
        "callbacks.best_checkpoint=null",
        "callbacks.loss_plot=null",
        f"run_dir={root}/run",
        "overwrite=true",
        f"init_from={init}" if init else "init_from=null",
    ]
    if stage == "sft":
        out.append("data.packing=true")
    return out + list(extra)


def fit_step_times(args: list) -> tuple[list[float], int, ModelConfig]:
    """Step times of Trainer.fit, tokens per step, the model config (vocab_size filled in)."""
    run = build(args)
    timer = StepTimer()
    run.trainer.callbacks.append(timer)
    batch = next(iter(run.datamodule.train_dataloader()))
    run.fit()
    return [b - a for a, b in zip(timer.ends, timer.ends[1:])], tokens_of(batch), run.module.model.config


def bare_step_times(args: list, steps: int, precision: str, device: str) -> tuple[list[float], float]:
    """Step times of a bare loop, and the MB autograd saved for the backward in its first step."""
    run = build(args, inspect=True)
    module = run.module.to(device)
    if module.reference is not None:
        module.reference.to(device)
    optimizer = module.configure_optimizers()["optimizer"]
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
    module.train()
    ends, saved = [], {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for i, batch in enumerate(run.datamodule.train_dataloader()):
        if i == steps:
            break
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        hooks = torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t) if i == 0 else nullcontext()
        with autocast, hooks:
            loss = module.training_step(batch, i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    activations = sum(n for ptr, n in saved.items() if ptr not in weights)  # parameters are no extra memory
    return [b - a for a, b in zip(ends, ends[1:])], activations / 2**20


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--stages", nargs="+", default=["pretrain", "sft", "dpo"])
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--override", nargs="*", default=[], help="more train overrides (data.dir=..., model.*)")
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--checkpointing", nargs="+", default=["off"], choices=["off", "on"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the best available)")
    parser.add_argument("--bare", action=argparse.BooleanOptionalAction, default=True, help="also time a bare loop")
    parser.add_argument("--peak-size", type=int, default=2048)
    parser.add_argument("--out-dir", default="outputs/bench")
    args = parser.parse_args(argv)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    device = args.device or best_device()
    accelerator = [
        "trainer.accelerator=gpu" if device == "cuda" else f"trainer.accelerator={device}",
        "trainer.devices=1",
    ]
    if device == "cpu" and not cpu_has_fast_bf16() and "bf16-mixed" in args.precisions:
        args.precisions = [p for p in args.precisions if p != "bf16-mixed"]  # training would run fp32 (device.py)
        print("this CPU has no native bf16 (AVX512_BF16 or AMX): bf16-mixed would train in 32-true, not measured")
    size = args.peak_size * (4 if device == "cuda" else 1)  # a GPU reaches its peak on larger matrices
    peaks = {
        "32-true": measure_peak(torch.float32, size, device=device),
        "bf16-mixed": measure_peak(torch.bfloat16, size, device=device),
    }
    print(
        f"measured matmul peak: fp32 {peaks['32-true'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16-mixed'] / 1e9:.0f} GFLOP/s"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for preset in args.presets:
            for stage in args.stages:
                init = None
                if stage in ("sft", "dpo"):  # a random init of the right shape (and tokenizer) is enough here
                    probe = build(
                        overrides(preset, "pretrain", "32-true", 1, tmp / "probe", None, args.override), inspect=True
                    )
                    torch.manual_seed(0)
                    init = save_pretrained(
                        MiniGPT(probe.module.model.config), probe.datamodule.tokenizer, tmp / f"init_{preset}"
                    )
                for precision, compiled, ckpt in itertools.product(args.precisions, args.compile, args.checkpointing):
                    switches = accelerator + [f"compile={compiled == 'on'}"]
                    switches.append(f"model.gradient_checkpointing={ckpt == 'on'}")
                    extra = switches + list(args.override)
                    common = overrides(preset, stage, precision, args.steps, tmp / "fit", init, extra)
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    fit, tokens, config = fit_step_times(common)
                    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
                    bare, saved_mb = [], None
                    if args.bare:
                        bare_args = overrides(preset, stage, precision, args.steps, tmp / "bare", init, extra)
                        bare, saved_mb = bare_step_times(bare_args, args.steps, precision, device)
                    fit, bare = fit[args.warmup :] or fit, bare[args.warmup :] or bare
                    flops = flops_per_token(config, config.block_size)
                    fit_rate, bare_rate = median_rate(fit, tokens), median_rate(bare, tokens)
                    rows.append(
                        {
                            "preset": preset,
                            "stage": stage,
                            "precision": precision,
                            "compile": compiled,
                            "ckpt": ckpt,
                            "tokens/step": tokens,
                            "fit tok/s": fit_rate,
                            "bare tok/s": bare_rate if bare else None,
                            "MFU": flops * fit_rate / peaks[precision],
                            "bare MFU": flops * bare_rate / peaks[precision] if bare else None,
                            "overhead": bare_rate / fit_rate - 1 if fit_rate and bare else None,
                            "saved MB": saved_mb,
                            "peak MB": peak_mb,
                        }
                    )
                    print_table(rows[-1:], list(rows[-1]))
    columns = list(rows[-1]) if rows else []
    print()
    print_table(rows, columns)
    payload = {"device": device, "peak_flops": peaks, "steps": args.steps, "warmup": args.warmup, "rows": rows}
    write("train_throughput", payload, Path(args.out_dir))
    return payload


if __name__ == "__main__":
    main()
