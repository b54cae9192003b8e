"""Token-level hidden-state distillation: every query token's last hidden state pulled toward
the teacher's (TinyBERT's and DynaBERT's hidden-state loss, Jiao et al. 2020, Hou et al. 2020,
here as a cosine so that it is on the scale of the pooled cosine term).

    L_tok = mean over the real tokens of the batch of  1 - cos(h_k[b, i], h_t[b, i])

h_k: the SubLM's last hidden states, h_t: the teacher's, both (B, T, d). Width pruning keeps
the hidden size, so they compare without a projection. Why beside the pooled cosine: the pooled
embedding is one d-vector per query, the mean of T token states; matching each token is T
targets per query, a denser signal per step for the narrow SubLMs, and it implies the mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_cosine_loss(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos over the real tokens; see the module docstring.

    Args:
        student, teacher: (B, T, d) last hidden states; attention_mask: (B, T), 1 for tokens.

    Returns:
        a scalar in [0, 2].

    Raises:
        ValueError: the shapes differ, or the mask holds no token.
    """
    if student.shape != teacher.shape or student.shape[:2] != attention_mask.shape:
        raise ValueError(f"token_cosine_loss: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}, "
                         f"mask {tuple(attention_mask.shape)} do not match")
    m = attention_mask.to(student.dtype)  # (B, T)
    n = m.sum()
    if n == 0:
        raise ValueError("token_cosine_loss: the attention mask holds no token")
    cos = F.cosine_similarity(student, teacher, dim=-1)  # (B, T)
    return ((1 - cos) * m).sum() / n
