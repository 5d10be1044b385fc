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


# ---- reward model ----


def bt_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, center_coef: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry pairwise loss on scalar rewards, each (B,):

        L = -mean log σ(r_w - r_l)  +  c · mean((r_w + r_l)²)

    The second term (reward centering, Eisenstein et al. 2023; TRL's `center_rewards_coefficient`) pulls the
    rewards of a pair towards a zero mean; c = 0 turns it off. Returns the loss and pairwise accuracy / margin.
    """
    margin = chosen.float() - rejected.float()
    loss = -F.logsigmoid(margin).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen.float() + rejected.float()) ** 2).mean()
    return loss, {"accuracy": (margin > 0).float().mean(), "margin": margin.detach().mean()}


# ---- RL helpers: shapes (B, T) over completion tokens, `mask` 1 on real completion tokens ----


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance); the mean is added back if not shift_mean."""
    mean = masked_mean(x, mask)
    n = mask.sum().clamp(min=2)
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(token_t | ...) for each position: logits (B, T, V) aligned with tokens (B, T) -> (B, T) fp32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = -Σ_v p_v log p_v per position: (B, T, V) -> (B, T) fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016) over each completion, (B, T) each:

        δ_t = r_t + γ V_{t+1} - V_t        (V after the last token = 0)
        A_t = δ_t + γ λ A_{t+1}             returns R_t = A_t + V_t

    Entries outside `mask` (padding after the end) count as reward 0 and value 0. Returns (advantages, returns).
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def ppo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (Schulman et al. 2017), per token, averaged over completion tokens:

        ρ_t = exp(log π(a_t) - log π_old(a_t)),   L = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1-ε, 1+ε))

    Metrics (TRL's PPO names): clip fraction and approx KL ½ mean (log ρ)².
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask),
        "approxkl": 0.5 * masked_mean(log_ratio.detach() ** 2, mask),
        "ratio": masked_mean(ratio.detach(), mask),
    }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss:  V_clip = V_old + clip(V - V_old, -ε_v, ε_v),
    L = ½ mean_t max((V - R)², (V_clip - R)²). Returns the loss and the fraction where the clipped term wins."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    return loss, {"clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), mask)}


SCALE_REWARDS = ("group", "batch", "none")
GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024): rewards (B·G,) in consecutive groups of G completions of one prompt,

        A_i = (r_i - mean(group)) / s,   s = std(group) + 1e-4 ("group"), std(batch) + 1e-4 ("batch"), 1 ("none")

    std is the unbiased sample std, as in TRL; "none" is Dr. GRPO's unscaled advantage (Liu et al. 2025).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"stage.scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        advantages = advantages / (grouped.std(1).repeat_interleave(group_size) + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + 1e-4)
    return advantages


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π || π_ref) estimate, non-negative and unbiased (Schulman's k3):
    exp(ref - logp) - (ref - logp) - 1."""
    diff = ref_logprobs - logprobs
    return torch.exp(diff) - diff - 1


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.04,
    clip: float = 0.2,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO objective per token, with sequence advantages A (B,) broadcast over the completion (B, T):

        ℓ_t = -min(ρ_t A, clip(ρ_t, 1-ε, 1+ε) A) + β KL_k3(π || π_ref)_t

    aggregated as TRL does by `loss_type`:
        grpo     mean over each completion's tokens, then over completions (length-biased, the paper's)
        dapo     sum over all tokens / number of completion tokens in the batch (Yu et al. 2025)
        dr_grpo  sum over all tokens / (B · max_completion_length) (Liu et al. 2025)
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"stage.loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    stats = {}
    if ref_logprobs is not None:
        kl = kl_k3(logprobs, ref_logprobs)
        stats["kl"] = masked_mean(kl.detach(), mask)
        if beta:
            per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    else:
        width = max_completion_length or mask.shape[1]
        loss = (per_token * mask).sum() / (mask.shape[0] * width)
    low = (ratio < 1 - clip) & (adv < 0)
    high = (ratio > 1 + clip) & (adv > 0)
    stats |= {
        "clip_ratio/low_mean": masked_mean(low.float(), mask),
        "clip_ratio/high_mean": masked_mean(high.float(), mask),
        "clip_ratio/region_mean": masked_mean((low | high).float(), mask),
    }
    return loss, stats
