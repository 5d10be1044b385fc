"""At the end of fit: `<run_dir>/loss.png`, train and val loss against step, from the CSV log (which keeps
the whole history across resumes). Needs matplotlib (the `plots` extra; `make` installs it): without it the
run says so and draws nothing."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

log = logging.getLogger(__name__)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


PLOTS_HINT = "matplotlib is not installed (pip install 'minillm-lab[plots]'; in a checkout: pip install -e '.[plots]')"


def read_metric(csv_path: Path, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get(key):
                steps.append(int(row["step"]))
                values.append(float(row[key]))
    return steps, values


def plot_losses(csv_path: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        steps, values = read_metric(csv_path, key)
        if steps:
            ax.plot(steps, values, style, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


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
