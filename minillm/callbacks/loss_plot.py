"""At the end of fit: `<run_dir>/loss.png`, train and val loss against step, from the CSV log (which keeps
the whole history across resumes). Needs matplotlib (the `plots` extra; `make` installs it): without it the
run says so and draws nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from minillm.plots import PLOTS_HINT, have_matplotlib, plot_losses

log = logging.getLogger(__name__)


class LossPlot(L.Callback):
    def __init__(self, run_dir: str) -> None:
        self.run_dir = Path(run_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.save()
        csv_logs = [Path(lg.log_dir) / "metrics.csv" for lg in trainer.loggers if isinstance(lg, CSVLogger)]
        if not csv_logs or not csv_logs[0].is_file():
            log.warning("no CSV metrics log: loss.png not written (keep logger.csv)")
            return
        if not have_matplotlib():
            log.info("loss.png not drawn: %s; the numbers are in %s", PLOTS_HINT, csv_logs[0])
            return
        log.info("loss curves: %s", plot_losses(csv_logs[0], self.run_dir / "loss.png"))
