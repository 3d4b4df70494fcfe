"""Logit distillation (Hinton et al.): KL between the teacher's and the student's softened output
distributions, scaled by T^2; with `skew` > 0, DistiLLM's skew KL against a mixture of the two."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check_range
from ..methods import Batch, Needs
from .base import TERMS, DistillationTerm, TermConfig


@dataclass
class LogitDistillation(TermConfig):
    temperature: float = 2.0  # softens both distributions; the loss is scaled by T^2 to keep gradient size
    skew: float = 0.0  # DistiLLM: KL(p || skew*p + (1-skew)*q); 0 is the plain KL(p || q)

    def validate(self, key: str) -> None:
        super().validate(key)
        check_range(f"{key}.temperature", self.temperature, 0.0, low_open=True)
        check_range(f"{key}.skew", self.skew, 0.0, 1.0, high_open=True)


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, skew: float = 0.0
) -> torch.Tensor:
    """T^2 * KL(p || skew*p + (1-skew)*q), p = softmax(teacher/T), q = softmax(student/T), over the last
    axis and averaged over rows."""
    student_log_probs = F.log_softmax(student.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher.float() / temperature, dim=-1)
    if skew:
        student_log_probs = torch.logaddexp(
            math.log(skew) + teacher_log_probs, math.log1p(-skew) + student_log_probs
        )
    rows = student_log_probs.reshape(-1, student_log_probs.shape[-1])
    kl = F.kl_div(rows, teacher_log_probs.reshape_as(rows), log_target=True, reduction="batchmean")
    return kl * temperature**2


@TERMS.register("logit_kd", LogitDistillation)
class LogitDistiller(DistillationTerm):
    config: LogitDistillation
    needs = Needs(teacher=True)

    def term_loss(self, batch: Batch) -> torch.Tensor:
        """KD averaged over the task's outputs (start and end logits for SQuAD)."""
        student, teacher = batch.student.logits, batch.teacher.logits
        losses = [kd_loss(student[k], teacher[k], self.config.temperature, self.config.skew) for k in student]
        return torch.stack(losses).mean()
