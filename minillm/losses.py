"""Losses as pure functions: tensors in, tensors out, no Lightning, no state. `-100` marks ignored targets.

Shapes: B batch, T positions, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy  L = -1/N * sum_{t: y_t != -100} log softmax(z_t)[y_t],  computed in fp32.

    logits (B, T, V) predict targets (B, T); N counts the targets that are not -100. With reduction="sum" the
    sum is returned (the caller divides, e.g. by the tokens of a whole optimizer step).
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens:  log π(y|x) = Σ_{t: y_t != -100} log softmax(z_t)[y_t].

    logits (B, T, V) are aligned with labels (B, T) (shift before calling). A sum, not a per-token mean: DPO
    compares the probabilities of whole completions. Returns (B,) in fp32.
    """
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (logp * mask).sum(-1)


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct Preference Optimization on summed completion log-probs, each (B,).

    With h = (log π(y_w|x) - log π(y_l|x)) - (log π_ref(y_w|x) - log π_ref(y_l|x)):
      sigmoid (Rafailov et al. 2023, with conservative label smoothing ε):
          L = -(1 - ε) log σ(β h) - ε log σ(-β h)              (= ln 2 when π == π_ref)
      ipo (Azar et al. 2023):    L = (h - 1 / (2β))²
      hinge (SLiC, Zhao et al.): L = max(0, 1 - β h)
    Implicit rewards r = β (log π - log π_ref). Returns the batch mean and TRL-named metrics.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"stage.loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }
    return losses.mean(), metrics
