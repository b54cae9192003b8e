"""Listwise score distillation for rankers: the student's distribution over a query's group of
passages pulled toward a teacher's (Hinton et al. 2015, applied per query's candidate list).

    kd = tau^2 * KL( softmax(t / tau) || softmax(s / tau) ),   averaged over the queries

t: the teacher's scores of the group (for the ranker's teacher: the dense teacher's cosine
similarities times its training scale 20, i.e. temperature 0.05); s: the student's. The tau^2
factor keeps the gradients on the scale of the hard-label loss as tau changes (the tempered KL's
gradient shrinks as 1 / tau^2). Soft targets also carry what a single pseudo-positive cannot:
that several candidates may be relevant, so the group's other passages are not all pushed down.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def listwise_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Distillation of (B, m) group scores; see the module docstring.

    Raises:
        ValueError: the shapes differ, or temperature <= 0.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"listwise_kd: student scores {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    if not temperature > 0:
        raise ValueError(f"listwise_kd: temperature must be > 0, got {temperature}")
    tau = temperature
    kl = F.kl_div(F.log_softmax(student / tau, -1), F.log_softmax(teacher / tau, -1), reduction="batchmean",
                  log_target=True)
    return tau**2 * kl
