"""KD loss: zero for identical logits, the T^2 scaling, and the alpha = 0 / 1 limits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastcpu.distillation import LogitDistillation, NoDistillation, kd_loss, make_loss


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(6, 40, generator=torch.Generator().manual_seed(seed))


def test_kd_is_zero_for_identical_logits_and_positive_otherwise():
    student = _logits(0)
    assert kd_loss(student, student.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(student, _logits(1), 2.0).item() > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_is_t_squared_times_the_softened_kl(temperature):
    student, teacher = _logits(0), _logits(1)
    p = F.softmax(teacher / temperature, dim=-1)
    kl = (p * (p.log() - F.log_softmax(student / temperature, dim=-1))).sum(-1).mean()
    assert kd_loss(student, teacher, temperature).item() == pytest.approx(
        temperature**2 * kl.item(), rel=1e-5
    )


def test_t_squared_keeps_gradients_comparable_across_temperatures():
    """Soft-target gradients shrink as 1/T^2; the T^2 factor restores their size (Hinton et al.)."""
    teacher = _logits(1) * 0.1
    norms = []
    for temperature in (4.0, 8.0):
        student = (_logits(0) * 0.1).requires_grad_()
        kd_loss(student, teacher, temperature).backward()
        norms.append(student.grad.norm().item())
    assert norms[0] == pytest.approx(norms[1], rel=0.1)


def test_alpha_limits():
    student = {"start_logits": _logits(0), "end_logits": _logits(2)}
    teacher = {"start_logits": _logits(1), "end_logits": _logits(3)}
    task_loss = torch.tensor(3.0)
    labels_only = make_loss(LogitDistillation(temperature=2.0, alpha=0.0))
    kd_only = make_loss(LogitDistillation(temperature=2.0, alpha=1.0))
    half = make_loss(LogitDistillation(temperature=2.0, alpha=0.5))
    kd = (
        kd_loss(student["start_logits"], teacher["start_logits"], 2.0)
        + kd_loss(student["end_logits"], teacher["end_logits"], 2.0)
    ) / 2
    assert labels_only(task_loss, student, teacher).item() == pytest.approx(3.0)
    assert kd_only(task_loss, student, teacher).item() == pytest.approx(kd.item(), rel=1e-6)
    assert half(task_loss, student, teacher).item() == pytest.approx(0.5 * kd.item() + 1.5, rel=1e-6)
    assert make_loss(NoDistillation())(task_loss, student, None).item() == 3.0
