"""Exact resume of the logs: every checkpoint says which logger step it resumes at, and carries the row of
metrics its own step had not logged yet.

Lightning writes checkpoints at three points of a training step, and they differ in its logger counter
(`_batches_that_stepped`, the `step` column of metrics.csv):
- `on_train_batch_end` (step-N, interrupt): the step's row is not logged yet; the counter is that row's label.
- `on_validation_end` (best, and step-N/last/interrupt when validation runs after the step): every row of the
  step is logged; Lightning moves the counter on when it resumes. (Resuming from a validation that only ran
  because the run was stopping is one label behind: minillm/callbacks/interrupt.py never runs one.)
Lightning's own `last.ckpt` at `on_train_end` is not used: the loader has moved on by then (see
minillm/callbacks/checkpoint.py).

On resume, `replay` drops the rows the interrupted attempt logged at or after the checkpoint's label (a killed
run may have logged further than its last checkpoint) and writes the step's pending row, so `metrics.csv` holds
exactly one row per logged step, the same as an uninterrupted run. The CSV log is flushed at every row (see
minillm/csv_logger.py), so a row older than the newest checkpoint is always on disk.
"""

from __future__ import annotations

import lightning as L

KEY = "minillm_log"  # in the checkpoint: {"step": label to resume at, "pending": {metric: float} or None}


def annotate(trainer: L.Trainer, checkpoint: dict) -> None:
    loop = trainer.fit_loop.epoch_loop
    if "loops" not in checkpoint or not trainer.training and not trainer.validating:
        return
    label, pending = loop._batches_that_stepped, None
    progress = loop.batch_progress.total
    if trainer.validating:  # on_validation_end: the step is fully logged (Lightning moves the label on itself)
        label += 1
    elif progress.completed == progress.processed - 1:  # on_train_batch_end: the step's row comes after this
        connector = trainer._logger_connector
        if connector.should_update_logs and not trainer.fit_loop._should_accumulate():
            pending = {k: v.item() if hasattr(v, "item") else v for k, v in connector.metrics["log"].items()}
            pending.setdefault("epoch", trainer.current_epoch)
    checkpoint[KEY] = {"step": label, "pending": pending}


def replay(trainer: L.Trainer, state: dict | None) -> None:
    """In a resumed run, before its first step: cut the CSV history at the resume label, write the pending row."""
    if state is None:
        return
    from minillm.csv_logger import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            logger.truncate(state["step"])
        if state["pending"]:
            metrics = dict(state["pending"])
            if not isinstance(logger, CSVLogger):
                metrics.pop("epoch", None)
            logger.log_metrics(metrics, step=state["step"])
