"""SIGINT / SIGTERM: finish the current optimizer step (and its validation, when one is due after it), save a
checkpoint, say how to continue, stop. No validation the uninterrupted run would not do runs after the signal.

The handlers are installed when training starts (replacing Lightning's, so its own interrupt handling never
races ours) and restored at teardown, so several runs in one process (multirun) don't leak them. A second
SIGINT exits at once. The entry point exits with 130 (SIGINT) or 143 (SIGTERM) after the save.

Outside the training loop (start-up: config, tokenizer, dataset, Lightning's set-up; the export after it) the
command line's `CommandSignals` (minillm/signals.py) takes the signals.

Fault injection for tests: MINILLM_FAULT_SIGNAL_AT_STEP=N (with MINILLM_FAULT_SIGNAL=SIGINT|SIGTERM, default
SIGTERM) makes the process send itself that signal when optimizer step N + 1 starts, as `kill` from another
shell would, but at a known step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from minillm.callbacks.checkpoint import save_resume_point, validation_follows
from minillm.signals import SIGNALS, CommandSignals

log = logging.getLogger(__name__)
FAULT_STEP_ENV, FAULT_SIGNAL_ENV = "MINILLM_FAULT_SIGNAL_AT_STEP", "MINILLM_FAULT_SIGNAL"


class InterruptCallback(Checkpoint):  # a Checkpoint: Lightning runs it after the other checkpoint callbacks
    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.received: int | None = None  # the signal number, once one arrived
        self.saved_to: Path | None = None
        self._save_after_validation = False
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int:
        return 128 + self.received if self.received else 0

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            os.write(2, b"\nsecond interrupt: exiting now, without a checkpoint\n")
            os._exit(128 + signum)
        self.received = signum
        os.write(2, f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step\n".encode())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        CommandSignals.training_started = True
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled in the main thread
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        at = os.environ.get(FAULT_STEP_ENV)
        if at and int(at) == trainer.global_step and self.received is None:  # fault injection (see the docstring)
            os.kill(os.getpid(), signal.Signals[os.environ.get(FAULT_SIGNAL_ENV, "SIGTERM")])

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if not stop or trainer.fit_loop._should_accumulate() or pl_module.stop_reason is not None:
            return  # only at an optimizer-step boundary, once
        self.received = self.received or signal.SIGTERM  # a rank that got nothing follows the others
        pl_module.stop_reason = "interrupt"
        if validation_follows(trainer):
            # the step's validation runs, then on_validation_end saves and stops; `should_stop` is not set yet,
            # since Lightning would log this step's metrics row although it is off the log schedule
            self._save_after_validation = True
            return
        trainer.limit_val_batches = 0  # stopping would force a validation the uninterrupted run never does
        self._save(trainer)
        trainer.should_stop = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._save_after_validation:
            self._save_after_validation = False
            self._save(trainer)
            trainer.should_stop = True

    def _save(self, trainer: L.Trainer) -> None:
        self.saved_to = self.dirpath / f"interrupt-step-{trainer.global_step:06d}.ckpt"
        if save_resume_point(trainer, self.saved_to):
            log.warning(
                "received interrupt signal — checkpoint saved to %s; rerun with resume=auto to continue", self.saved_to
            )
        else:  # the weights are not finite: the last checkpoint on disk is the state to go back to
            self.saved_to = None
            log.warning("received interrupt signal — nothing saved (the weights are not finite)")
