"""MiniLMv2 self-attention relations (paper eq. 7-8; Wang et al. 2021, "MiniLMv2").

The teacher's last MHA block computes Q, K and V (each (B, T, d)) from the input of its last
layer. MiniLMv2 merges the A attention heads and re-splits each of Q, K, V into R *relation
heads* of d_r = d / R columns, and turns every relation head into a (T, T) distribution:

    Reln(X; W_j) = softmax(X W_j (X W_j)^T / sqrt(d_r))                      (eq. 8)

The student side: a SubLM may have pruned heads in its last layer, so an additional MHA block
(``RelationHead``, Q/K/V projections only, trained with the student and thrown away after
distillation) reads the SubLM's last hidden states and produces the student relations.
Eq. 8 prints the divisor as d^R; we use sqrt(d_r), the attention scaling of MiniLMv2's code.

R: the paper uses R = 32 at hidden 768, i.e. d_r = 24. The teacher here has hidden 384; R = 16
keeps d_r = 24, so every relation head sees as many dimensions as in the paper (R = 12 would
merely replay the teacher's own 12 heads of 32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("query", "key", "value")


class RelationHead(nn.Module):
    """The additional MHA block on top of the student (Q, K, V projections, hidden -> hidden).

    Args:
        hidden: the student's hidden size; ``init_from``: optionally the teacher's last
            ``_SelfAttn`` (its query/key/value Linear layers, full width) to start from.
    """

    def __init__(self, hidden: int, init_from: nn.Module | None = None):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in KINDS)
        if init_from is not None:
            with torch.no_grad():
                for k in KINDS:
                    src = getattr(init_from, k)
                    if src.weight.shape != (hidden, hidden):
                        raise ValueError(f"relation head init: teacher {k} weight is {tuple(src.weight.shape)}, "
                                         f"expected ({hidden}, {hidden})")
                    getattr(self, k).weight.copy_(src.weight)
                    getattr(self, k).bias.copy_(src.bias)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, num_relation_heads: int) -> dict:
        """(B, T, d) student last hidden states -> {kind: (B, R, T, T) log-relations}."""
        return {k: log_relations(getattr(self, k)(hidden), attention_mask, num_relation_heads) for k in KINDS}


def log_relations(x: torch.Tensor, attention_mask: torch.Tensor, num_relation_heads: int) -> torch.Tensor:
    """Log of eq. 8 for one kind (Q, K or V).

    Args:
        x: (B, T, d) projected states (X W^Q for the query relation ...).
        attention_mask: (B, T), 1 for tokens; padded keys get probability 0.
        num_relation_heads: R; must divide d.

    Returns:
        (B, R, T, T) log-probabilities over keys.
    """
    B, T, d = x.shape
    if d % num_relation_heads:
        raise ValueError(f"relation heads: hidden size {d} is not divisible by R = {num_relation_heads}")
    dr = d // num_relation_heads
    h = x.view(B, T, num_relation_heads, dr).transpose(1, 2)  # (B, R, T, d_r)
    scores = h @ h.transpose(-1, -2) / math.sqrt(dr)  # (B, R, T, T)
    scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
    return F.log_softmax(scores, dim=-1)


@torch.no_grad()
def teacher_relations(teacher: nn.Module, batch: dict, num_relation_heads: int) -> dict:
    """{kind: (B, R, T, T)} log-relations of the teacher's last MHA block.

    ``teacher`` is an ElasticBert at full width; its last layer's Q/K/V read that layer's input.
    """
    states = teacher(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), all_hidden_states=True)
    return last_layer_relations(teacher, states[-2], batch["attention_mask"], num_relation_heads)


@torch.no_grad()
def last_layer_relations(teacher: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor,
                         num_relation_heads: int) -> dict:
    """{kind: (B, R, T, T)} log-relations of ``teacher``'s (an ElasticBert at full width) last MHA
    block from x, (B, T, d) the input of its last layer (``all_hidden_states[-2]``); for callers
    that need the teacher's other outputs from the same forward (training/ranker.py)."""
    att = teacher.encoder.layer[-1].attention.self
    return {k: log_relations(getattr(att, k)(x), attention_mask, num_relation_heads) for k in KINDS}


def relation_kl(teacher: dict, student: dict, attention_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 7: sum over Q, K, V of KL(teacher relation || student relation).

    Each KL is over keys, averaged over relation heads and over the real (unpadded) query
    positions, as MiniLMv2 does, so the loss does not grow with R or T.

    Args:
        teacher, student: {kind: (B, R, T, T) log-probabilities}; attention_mask: (B, T).
    """
    m = attention_mask.to(next(iter(teacher.values())).dtype)  # (B, T)
    denom = m.sum() * next(iter(teacher.values())).shape[1]  # real query positions x R
    total = 0.0
    for k in KINDS:
        t, s = teacher[k], student[k]
        diff = torch.where(attention_mask[:, None, None, :] > 0, t - s, torch.zeros_like(t))  # padded keys: p = 0
        kl = (t.exp() * diff).sum(-1)  # (B, R, T) per query position
        total = total + (kl * m[:, None, :]).sum() / denom
    return total
