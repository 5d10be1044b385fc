"""SIGINT / SIGTERM: finish the current optimizer step, save a checkpoint, say how to continue, stop.

The handlers are installed when training starts (replacing Lightning's, so its own interrupt handling never
races ours) and restored at teardown, so several runs in one process (multirun) don't leak them. A second
SIGINT exits at once. The entry point exits with 130 (SIGINT) or 143 (SIGTERM) after the save.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class InterruptCallback(L.Callback):
    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.received: int | None = None  # the signal number, once one arrived
        self.saved_to: Path | None = None
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
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled in the main thread
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if not stop or trainer.fit_loop._should_accumulate():  # only at an optimizer-step boundary
            return
        self.received = self.received or signal.SIGTERM  # a rank that got nothing follows the others
        self.saved_to = self.dirpath / f"interrupt-step-{trainer.global_step:06d}.ckpt"
        trainer.save_checkpoint(self.saved_to)
        log.warning(
            "received interrupt signal — checkpoint saved to %s; rerun with resume=auto to continue", self.saved_to
        )
        pl_module.stop_reason = "interrupt"
        trainer.should_stop = True
