"""Localized contrastive estimation (LCE; Gao, Dai & Callan, ECIR 2021): ElasticRanker's task loss,
the paper's eq. 9 with eq. 11's similarity (§4.4).

For a query q with one positive p+ and m - 1 negatives sampled from the top ranks of the first-stage
retrievers (hence "localized": the ranker learns to tell apart what those retrievers confuse),

    L = -log( exp(s(q, p+)) / (exp(s(q, p+)) + sum_l exp(s(q, p_l-))) ),   s = eq. 11's score.

No temperature: eq. 9 has none, and the linear head w of eq. 11 learns the scale of the scores.
It is the cross-entropy of the group's scores against the positive's index (0 here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lce_loss(scores: torch.Tensor) -> torch.Tensor:
    """Mean LCE over a batch of groups.

    Args:
        scores: (B, m) cross-encoder scores, column 0 the positive, columns 1..m-1 its negatives.

    Returns:
        Scalar loss (nats).

    Raises:
        ValueError: scores is not 2-D with at least one negative per group.
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"lce_loss: expected (B, m >= 2) scores, positive first, got {tuple(scores.shape)}")
    return F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))
