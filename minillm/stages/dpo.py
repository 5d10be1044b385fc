"""Direct Preference Optimization against a frozen reference (the SFT model this stage starts from).

Per pair: h = (log π(y_w|x) - log π(y_l|x)) - (log π_ref(y_w|x) - log π_ref(y_l|x)) on summed completion
log-probs, L = -log σ(β h) (see `losses.dpo_loss` for ipo, hinge and label smoothing). Chosen and rejected go
through the policy in one concatenated forward. With `rpo_alpha` > 0 the loss adds α times the policy's mean
per-token negative log-likelihood of the chosen replies (RPO, TRL's `rpo_alpha`): DPO alone can lower the
likelihood of the right answer as long as the wrong one falls faster, and greedy answers then get worse.
The reference lives outside the module tree — not optimized, not in checkpoints, not DDP-wrapped — and is moved
to the policy's device when fit starts. Dropout is switched off in both (probability 0, as TRL does: `.eval()`
would be undone after validation), so before the first update the loss is exactly ln 2.
"""

from __future__ import annotations

import torch

from minillm.config import Config, DPOConfig
from minillm.data.kinds import PREFERENCE
from minillm.losses import IGNORE_INDEX, dpo_loss, sequence_logprobs
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

    def _logps(self, model: MiniGPT, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(chosen, rejected) summed completion log-probs, each (B,), and the MoE load-balancing loss."""
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])  # (2B, T)
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        out = model(ids[:, :-1])
        logps = sequence_logprobs(out.logits, labels[:, 1:])  # (2B,)
        return *logps.chunk(2), out.aux_loss

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(DPO loss, its metrics, the policy's MoE load-balancing loss)."""
        chosen, rejected, aux = self._logps(self.model, batch)
        with torch.no_grad():
            ref_chosen, ref_rejected, _ = self._logps(self.reference, batch)
        loss, metrics = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type, self.label_smoothing
        )
        if self.dpo.rpo_alpha > 0:
            nll = -chosen.sum() / (batch["chosen_labels"][:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
            metrics["nll_loss"] = nll.detach()
            loss = loss + self.dpo.rpo_alpha * nll
        return loss, metrics, aux

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics, aux = self._step(batch)
        tokens = int(batch["chosen_ids"].numel() + batch["rejected_ids"].numel())
        extra = {"aux_loss": aux.detach()} if self.model.config.is_moe else {}
        self.log_train(loss + aux, tokens=tokens, **extra)
        self.log_dict(metrics, batch_size=len(batch["chosen_ids"]))  # TRL's names: rewards/*, logps/*
        return loss + aux

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, metrics, _ = self._step(batch)
        size = len(batch["chosen_ids"])
        self.val_loss.update(loss, weight=size)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=size)
