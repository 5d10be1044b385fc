"""`minillm debug`'s one step: its loss (or RLHF's metrics) and gradient norm, recorded for printing."""

from __future__ import annotations

import lightning as L
import torch


class FirstStep(L.Callback):
    """Records the loss (or RLHF's metrics) and the gradient norm of the one debug step."""

    def __init__(self) -> None:
        self.loss: float | None = None
        self.grad_norm: float | None = None
        self.metrics: dict[str, float] = {}  # RLHF's: a rollout and its updates

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad.detach().float() for p in pl_module.parameters() if p.grad is not None]
        self.grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(outputs, dict) and "loss" in outputs:
            self.loss = float(outputs["loss"])
        elif isinstance(outputs, dict):  # RLHF: one rollout batch and its updates report metrics
            self.metrics = dict(outputs.get("metrics", {}))
