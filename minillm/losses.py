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
