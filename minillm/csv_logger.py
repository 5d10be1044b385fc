"""Lightning's CSVLogger, except that
- a resumed run appends to `metrics.csv` instead of deleting it, so the file (and loss.png) holds the whole
  history of a run directory; `truncate(step)` drops the rows an interrupted attempt logged past its checkpoint
  (called by minillm/loop_state.py when a run resumes);
- every row is written to disk when it is logged (Lightning buffers 100 steps), so a killed run loses no row
  older than its newest checkpoint."""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # Lightning deletes an existing metrics.csv here
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(next(csv.reader(f), []))

    def truncate(self, step: int) -> int:
        """Drop every row at `step` or later (written or buffered); returns how many were dropped."""
        kept_buffer = [row for row in self.metrics if int(row["step"]) < step]
        dropped = len(self.metrics) - len(kept_buffer)
        self.metrics = kept_buffer
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                rows = list(csv.DictReader(f))
            kept = [row for row in rows if row.get("step") and int(float(row["step"])) < step]
            if len(kept) < len(rows):
                with open(self.metrics_file_path, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                    writer.writeheader()
                    writer.writerows(kept)
                dropped += len(rows) - len(kept)
        return dropped


class CSVLogger(LightningCSVLogger):
    def __init__(self, *args, flush_logs_every_n_steps: int = 1, **kwargs) -> None:
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def truncate(self, step: int) -> int:
        return self.experiment.truncate(step)
