"""Losses of the quick elastic recovery pass: a SubLM's embeddings aligned to the teacher's."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_alignment(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean (1 - cos) between rows of (B, d) student and teacher embeddings; 0 when equal."""
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def similarity_kl(student_q: torch.Tensor, teacher_q: torch.Tensor, passages: torch.Tensor, scale: float,
                  temperature: float) -> torch.Tensor:
    """KL(teacher || student) over each query's similarities to the in-batch passages.

    Args:
        student_q, teacher_q: (B, d) query embeddings; passages: (P, d) teacher passage
            embeddings (the fixed targets both sides score against).
        scale: similarities times ``scale`` are logits (20 for the teacher, see importance.py).
        temperature: softens both distributions; the KL is multiplied by temperature² so that
            its gradients keep their magnitude as the temperature changes (Hinton et al. 2015,
            as sentence-transformers' DistillKLDivLoss).
    """
    t = F.log_softmax(teacher_q @ passages.T * scale / temperature, dim=-1)  # (B, P)
    s = F.log_softmax(student_q @ passages.T * scale / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
