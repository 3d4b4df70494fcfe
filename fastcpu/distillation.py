"""The `distillation` config group: how the student learns from the teacher.

A method is a config dataclass plus a registered function building its loss:
`loss(task_loss, student_logits, teacher_logits) -> Tensor`, where the logits are dicts keyed by the
task's output names (start/end logits for SQuAD, logits for classification).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import Registry, check_range

DISTILLERS: Registry = Registry("distillation")

Logits = dict[str, torch.Tensor]
DistillationLoss = Callable[[torch.Tensor, Logits, Logits | None], torch.Tensor]


@dataclass
class NoDistillation:
    name: str = "none"


@dataclass
class LogitDistillation:
    name: str = "logit_kd"
    temperature: float = 2.0  # softens both distributions; the loss is scaled by T^2 to keep gradient size
    alpha: float = 0.5  # weight of the KD term; (1 - alpha) weighs the task loss

    def validate(self, key: str) -> None:
        check_range(f"{key}.temperature", self.temperature, 0.0, low_open=True)
        check_range(f"{key}.alpha", self.alpha, 0.0, 1.0)


def needs_teacher(config) -> bool:
    """Whether training must run the teacher forward."""
    return not isinstance(config, NoDistillation)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) over the last axis, averaged over rows."""
    student_log_probs = F.log_softmax(student.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher.float() / temperature, dim=-1)
    rows = student_log_probs.reshape(-1, student_log_probs.shape[-1])
    kl = F.kl_div(rows, teacher_log_probs.reshape_as(rows), log_target=True, reduction="batchmean")
    return kl * temperature**2


@DISTILLERS.register("none", NoDistillation)
def task_loss_only(config: NoDistillation) -> DistillationLoss:
    return lambda task_loss, student, teacher: task_loss


@DISTILLERS.register("logit_kd", LogitDistillation)
def logit_distillation(config: LogitDistillation) -> DistillationLoss:
    """alpha * KD(T) * T^2 + (1 - alpha) * task loss, KD averaged over the task's outputs."""

    def loss(task_loss: torch.Tensor, student: Logits, teacher: Logits | None) -> torch.Tensor:
        kd = torch.stack([kd_loss(student[k], teacher[k], config.temperature) for k in student]).mean()
        return config.alpha * kd + (1.0 - config.alpha) * task_loss

    return loss


def make_loss(config) -> DistillationLoss:
    return DISTILLERS.implementation(config)(config)
