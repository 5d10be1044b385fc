"""Gradient alarms: log the total norm, the largest |gradient| and the count of non-finite values each step;
warn on a spike (norm > spike_factor × running median); after `halt_on_nonfinite` skipped steps in a row
(the skip itself is LMModule's), save a checkpoint of the last good state and stop."""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

import lightning as L
import torch

from minillm.callbacks.checkpoint import save_resume_point

log = logging.getLogger(__name__)


class GradMonitor(L.Callback):
    def __init__(
        self, spike_factor: float = 10.0, window: int = 50, halt_on_nonfinite: int = 5, dirpath: str | None = None
    ) -> None:
        self.spike_factor, self.window, self.halt_on_nonfinite = spike_factor, window, halt_on_nonfinite
        self.dirpath = Path(dirpath) if dirpath else None
        self.history: list[float] = []  # recent finite norms, for the median
        self.spikes: list[int] = []  # steps that raised a spike warning

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad.detach() for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        stats = torch.stack(
            [  # (3,): one device sync per step, not one per parameter
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])),
                torch.stack([g.abs().max().float() for g in grads]).max(),
                torch.stack([(~torch.isfinite(g)).sum() for g in grads]).sum().float(),
            ]
        ).tolist()
        total, max_abs, nonfinite = stats[0], stats[1], int(stats[2])
        pl_module.log_dict({"grad/total_norm": total, "grad/max_abs": max_abs, "grad/nonfinite": float(nonfinite)})
        if nonfinite or not torch.isfinite(torch.tensor(total)):
            return
        if len(self.history) >= min(10, self.window):
            median = statistics.median(self.history)
            # median 0: the recent steps had no gradient at all (GRPO groups whose rewards were all equal) — no
            # baseline to call a spike against
            if median > 0 and total > self.spike_factor * median:
                self.spikes.append(trainer.global_step)
                log.warning(
                    "step %d: gradient norm %.3g is %.1f× the running median %.3g. If the loss jumps too or this "
                    "repeats, try a lower optim.lr or a longer optim.warmup_steps (gradient clipping: "
                    "trainer.gradient_clip_val)",
                    trainer.global_step,
                    total,
                    total / median,
                    median,
                )
        self.history = (self.history + [total])[-self.window :]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not self.halt_on_nonfinite or pl_module.nonfinite_streak < self.halt_on_nonfinite:
            return
        dirpath = self.dirpath or Path(trainer.default_root_dir) / "checkpoints"
        path = dirpath / f"halt-step-{trainer.global_step:06d}.ckpt"
        where = path if save_resume_point(trainer, path) else dirpath / "last.ckpt"
        log.error(
            "stopping: %d steps in a row had a non-finite loss or gradient (last at step %d); the last good "
            "state is %s. Lower optim.lr, check the data, or try trainer.precision=32-true",
            pl_module.nonfinite_streak,
            trainer.global_step,
            where,
        )
        pl_module.stop_reason = "nonfinite"
        trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"history": list(self.history), "spikes": list(self.spikes)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
        self.spikes = list(state_dict.get("spikes", []))
