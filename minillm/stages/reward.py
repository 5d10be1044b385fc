"""Reward model: the SFT backbone plus a linear scalar head, trained on preference pairs (the DPO data).

Bradley-Terry: P(y_w ≻ y_l | x) = σ(r(x, y_w) - r(x, y_l)), so  L = -log σ(r_w - r_l)  (+ optional reward
centering, see `losses.bt_loss`). r(x, y) is the head's score at the completion's last token (its <|im_end|>),
plus, with `stage.likelihood_weight` w set, w (learned from that start) times the trunk's mean log-likelihood of
the completion (`RewardModel`).
Chosen and rejected go through the model in one concatenated forward. `final/` holds the trunk and the head
(kind "reward"), which the RLHF stage loads with `load_reward_model`.
"""

from __future__ import annotations

import torch

from minillm.config import Config, RewardConfig
from minillm.data.kinds import PREFERENCE
from minillm.losses import IGNORE_INDEX, bt_loss
from minillm.model import RewardModel, first_token_index, last_token_index
from minillm.stages.base import LMModule


class RewardModule(LMModule):
    schema = RewardConfig
    data = PREFERENCE

    def __init__(self, config: Config, plain_config: dict, tokenizer_sha256: str = "") -> None:
        super().__init__(config, plain_config, tokenizer_sha256)
        self.center = config.stage.center_rewards_coefficient
        self.score = RewardModel(self.model.config, trunk=self.model).score  # the head; the trunk is self.model
        w = config.stage.likelihood_weight
        if w is not None and config.model.lora.enabled:
            raise ValueError(
                "stage.likelihood_weight with model.lora is not supported: a PEFT adapter has no place for the "
                "weight. Train the reward model without LoRA, or set stage.likelihood_weight=null"
            )
        self.likelihood_weight = None if w is None else torch.nn.Parameter(torch.tensor(float(w)))

    def exported_model(self) -> RewardModel:
        return RewardModel(
            self.model.config, trunk=self.model, score=self.score, likelihood_weight=self.likelihood_weight
        )

    def rewards(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen, rejected) rewards, each (B,), and the MoE load-balancing loss (0 for a dense model)."""
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])  # (2B, T), right-padded
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        completion = labels != IGNORE_INDEX
        end = last_token_index(completion)  # each completion's <|im_end|>
        scores, aux = self.exported_model().sequence_scores(
            ids, end, return_aux=True, first=first_token_index(completion)
        )
        return *scores.chunk(2), aux

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        chosen, rejected, aux = self.rewards(batch)
        loss, metrics = bt_loss(chosen, rejected, self.center)
        tokens = int(batch["chosen_ids"].numel() + batch["rejected_ids"].numel())
        if self.model.config.is_moe:
            metrics["aux_loss"] = aux.detach()
        self.log_train(loss + aux, tokens=tokens, **metrics)
        return loss + aux

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        chosen, rejected, _ = self.rewards(batch)
        loss, metrics = bt_loss(chosen, rejected, self.center)
        size = len(chosen)
        self.val_loss.update(loss, weight=size)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=size)
        self.log("val/reward_chosen", chosen.mean(), batch_size=size)
        if self.likelihood_weight is not None:
            self.log("val/likelihood_weight", self.likelihood_weight.detach(), batch_size=size)
