"""Direct Preference Optimization against a frozen reference (the SFT model this stage starts from).

Per pair: h = (log π(y_w|x) - log π(y_l|x)) - (log π_ref(y_w|x) - log π_ref(y_l|x)) on summed completion
log-probs, L = -log σ(β h) (see `losses.dpo_loss` for ipo, hinge and label smoothing). Chosen and rejected go
through the policy in one concatenated forward. The reference lives outside the module tree — not optimized,
not in checkpoints, not DDP-wrapped — and is moved to the policy's device when fit starts. Dropout is switched
off in both (probability 0, as TRL does: `.eval()` would be undone after validation), so before the first
update the loss is exactly ln 2.
"""

from __future__ import annotations

import torch

from minillm.config import Config, DPOConfig
from minillm.data.kinds import PREFERENCE
from minillm.losses import dpo_loss, sequence_logprobs
from minillm.model import MiniGPT
from minillm.stages.base import LMModule, Needs, disable_dropout


class DPOModule(LMModule):
    schema = DPOConfig
    data = PREFERENCE
    needs = Needs(reference=True)

    def __init__(self, config: Config, plain_config: dict, tokenizer_sha256: str = "") -> None:
        super().__init__(config, plain_config, tokenizer_sha256)
        self.dpo: DPOConfig = config.stage
        self.beta, self.loss_type, self.label_smoothing = self.dpo.beta, self.dpo.loss_type, self.dpo.label_smoothing
        disable_dropout(self.model)

    def on_fit_start(self) -> None:
        if self.reference is None:
            raise RuntimeError("DPO needs a reference model: build() sets it from init_from")
        self.reference.to(device=self.device)

    def _logps(self, model: MiniGPT, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])  # (2B, T)
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        logps = sequence_logprobs(model(ids[:, :-1]).logits, labels[:, 1:])  # (2B,)
        return logps.chunk(2)

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = self._logps(self.model, batch)
        with torch.no_grad():
            ref_chosen, ref_rejected = self._logps(self.reference, batch)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type, self.label_smoothing)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self._step(batch)
        tokens = int(batch["chosen_ids"].numel() + batch["rejected_ids"].numel())
        self.log_train(loss, tokens=tokens)
        self.log_dict(metrics, batch_size=len(batch["chosen_ids"]))  # TRL's names: rewards/*, logps/*
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, metrics = self._step(batch)
        size = len(batch["chosen_ids"])
        self.val_loss.update(loss, weight=size)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=size)
