"""The loss of ElasticLM's GLUE fine-tuning: the task loss plus logit distillation from the
fine-tuned teacher (Hinton et al. 2015, "KD" in the paper's Table 4), per SubLM.

    loss_k = (1 - alpha) * task(s_k, y) + alpha * kd(s_k, t)

- task: cross-entropy over classes; for STS-B (one output) the MSE to the gold score.
- kd, classification: tau^2 * KL(softmax(t / tau) || softmax(s_k / tau)), averaged over the
  batch. The tau^2 factor keeps the soft-target gradients on the scale of the hard-label ones
  as tau changes (the gradient of the tempered KL shrinks as 1 / tau^2).
- kd, regression: the MSE to the teacher's score (a single output has no distribution to
  temper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, C) logits, (B,) labels -> scalar: cross-entropy on class ids (C > 1), MSE on scores (C = 1)."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits[:, 0], labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


def logit_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Distillation from the teacher's (B, C) logits; see the module docstring.

    Raises:
        ValueError: the shapes differ (a teacher with another number of labels).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"logit KD: student logits {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    if student.shape[-1] == 1:
        return F.mse_loss(student, teacher)
    tau = temperature
    kl = F.kl_div(F.log_softmax(student / tau, -1), F.log_softmax(teacher / tau, -1), reduction="batchmean",
                  log_target=True)
    return tau**2 * kl


def glue_loss(student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None, alpha: float,
              temperature: float) -> torch.Tensor:
    """(1 - alpha) * task_loss + alpha * logit_kd; the task loss alone when ``teacher`` is None
    (fine-tuning the teacher itself)."""
    if teacher is None or alpha == 0:
        return task_loss(student, labels)
    return (1 - alpha) * task_loss(student, labels) + alpha * logit_kd(student, teacher, temperature)
