"""Supervised fine-tuning: next-token loss on assistant tokens only (each assistant turn and its <|im_end|>).

The objective of one optimizer step is  sum over assistant tokens of -log p  /  assistant tokens in the whole
step (all gradient-accumulation micro-batches, all ranks). The sampler tells every micro-batch that total
(`window_tokens`); Lightning divides the returned loss by `accumulate_grad_batches` and DDP averages gradients
over ranks, so both are multiplied back here. Accumulation and world size then leave the update unchanged.
"""

from __future__ import annotations

import torch

from minillm.config import SFTConfig
from minillm.data.kinds import SFT
from minillm.losses import IGNORE_INDEX, lm_loss
from minillm.model import document_index
from minillm.stages.base import LMModule


class SFTModule(LMModule):
    schema = SFTConfig
    data = SFT

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, labels = batch["input_ids"][:, :-1], batch["labels"][:, 1:]  # (B, T)
        positions = batch["position_ids"][:, :-1] if "position_ids" in batch else None
        documents = document_index(positions) if positions is not None else None  # packed: block-diagonal
        out = self.model(ids, position_ids=positions, document_ids=documents)
        return lm_loss(out.logits, labels, reduction="sum"), (labels != IGNORE_INDEX).sum(), out.aux_loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, n_tokens, aux = self._forward(batch)
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        world = self.trainer.world_size if self._trainer is not None else 1
        window_tokens = batch["window_tokens"][0].clamp(min=1)
        objective = loss_sum * accumulate * world / window_tokens + aux
        self.log_train(
            loss_sum / n_tokens.clamp(min=1),
            tokens=int(batch["input_ids"].numel()),
            assistant_tokens=n_tokens.float(),
            truncated=batch["truncated"].float().mean(),
        )
        return objective

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, n_tokens, _ = self._forward(batch)
        self.val_loss.update(loss_sum / n_tokens.clamp(min=1), weight=n_tokens)
