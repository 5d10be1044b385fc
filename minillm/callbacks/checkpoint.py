"""Checkpoints a run resumes from, each written where Lightning resumes it exactly (losses, data position and
logger labels): at the end of a training step (`on_train_batch_end`), or, for a step after which validation
runs, at the end of that validation (so a resumed run neither repeats nor skips it).

- `StepCheckpoint` (callbacks.checkpoint): `step-NNNNNN.ckpt` every `every_n_train_steps` (the newest
  `save_top_k` kept) and `last.ckpt`, also at the final step of a fit. `last.ckpt` is overwritten in place,
  never versioned (`last-v1.ckpt` would leave a stale `last.ckpt` after a resume or in a copied run dir).
- `save_resume_point` (the interrupt and the halt callbacks): a named checkpoint, copied to `last.ckpt` too, so
  `last.ckpt` is the newest state after any interrupt.

Neither writes weights that are not finite (a step that made them NaN or inf): the newest checkpoint then stays
the last good state, and `last.ckpt` keeps pointing at it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from minillm.files import fsync_dir

LAST = "last.ckpt"
log = logging.getLogger(__name__)


def weights_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter of `module` is finite (no NaN or inf)."""
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def refuse_nonfinite(trainer: L.Trainer, path: Path | str) -> bool:
    """True (and an error naming the step and `path`) when the weights are not finite: nothing is to be saved."""
    if weights_finite(trainer.lightning_module):
        return False
    log.error(
        "step %d: the weights are not finite (NaN or inf); %s not written: the last checkpoint on disk stays the last "
        "good state",
        trainer.global_step,
        Path(path).name,
    )
    return True


class BestCheckpoint(ModelCheckpoint):
    """Lightning's checkpoint (`best.ckpt`: the best by a metric), never of weights that are not finite."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if not refuse_nonfinite(trainer, filepath):
            super()._save_checkpoint(trainer, filepath)


class StepCheckpoint(BestCheckpoint):  # the same guard, on a step schedule
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)
        self._last_after_validation = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop._should_accumulate():
            return
        validates = validation_follows(trainer) and not self._should_save_on_train_epoch_end(trainer)
        due = self._every_n_train_steps > 0 and trainer.global_step % self._every_n_train_steps == 0
        final = 0 < trainer.max_steps <= trainer.global_step
        if validates and (due or final):
            self._defer_save_until_validation = due  # Lightning's own deferral: on_validation_end saves
            self._last_after_validation = final
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if final and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._last_after_validation and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_after_validation = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # Lightning would write last.ckpt here, after the loader has moved on: a resume point that is not exact


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether the loop validates right after the current training batch on its schedule (asked in
    on_train_batch_end). A validation that only runs because something set `should_stop` (an interrupt, early
    stopping) does not count: a checkpoint written after it would resume one log label behind."""
    fit_loop, stop = trainer.fit_loop, trainer.should_stop
    trainer.should_stop = False
    try:
        return bool(trainer.enable_validation and fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher))
    finally:
        trainer.should_stop = stop


def save_resume_point(trainer: L.Trainer, path: Path) -> bool:
    """Save `path` and make `last.ckpt` beside it the same state (a copy, replaced atomically). False (nothing
    written) when the weights are not finite."""
    if refuse_nonfinite(trainer, path):
        return False
    trainer.save_checkpoint(path)
    if trainer.is_global_zero:
        last = path.with_name(LAST)
        tmp = last.with_name(f"{LAST}.{os.getpid()}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, last)
        fsync_dir(path.parent)
    return True
