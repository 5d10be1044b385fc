"""Pretraining: next-token prediction on fixed windows of packed documents (EOS between documents)."""

from __future__ import annotations

import torch

from minillm.config import PretrainConfig
from minillm.data.kinds import PRETRAIN
from minillm.losses import lm_loss
from minillm.stages.base import LMModule


class PretrainModule(LMModule):
    schema = PretrainConfig
    data = PRETRAIN

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]  # (B, T + 1)
        out = self.model(ids[:, :-1])
        loss = lm_loss(out.logits, ids[:, 1:])
        extra = {"aux_loss": out.aux_loss} if self.model.config.is_moe else {}
        self.log_train(loss + out.aux_loss, tokens=ids[:, :-1].numel(), **extra)
        return loss + out.aux_loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        loss = lm_loss(self.model(ids[:, :-1]).logits, ids[:, 1:])
        self.val_loss.update(loss, weight=ids[:, 1:].numel())
