"""Distillation: the KD term (zero for identical logits, T^2 scaling, DistiLLM's skew KL), the weighted
objective, and a real training step whose loss depends on which teacher it is given."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert_model, tiny_squad_task
from transformers import BertForQuestionAnswering

from fastcpu.distillation import Distiller, build_distillation, kd_loss
from fastcpu.methods import Batch, Method, ModelOutputs
from fastcpu.teacher_outputs import LiveTeacher
from fastcpu.training import TrainingConfig, train


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


@pytest.mark.parametrize("skew", [0.1, 0.5, 0.9])
def test_skew_kd_is_the_kl_against_the_mixture(skew):
    """DistiLLM: KL(p || skew*p + (1-skew)*q); it shrinks toward 0 as skew grows toward 1."""
    student, teacher = _logits(0), _logits(1)
    p, q = F.softmax(teacher / 2.0, dim=-1), F.softmax(student / 2.0, dim=-1)
    mixture = skew * p + (1 - skew) * q
    expected = 4.0 * (p * (p.log() - mixture.log())).sum(-1).mean()
    assert kd_loss(student, teacher, 2.0, skew).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kd_loss(student, teacher, 2.0, skew).item() < kd_loss(student, teacher, 2.0).item()


def test_t_squared_keeps_gradients_comparable_across_temperatures():
    """Soft-target gradients shrink as 1/T^2; the T^2 factor restores their size (Hinton et al.)."""
    teacher = _logits(1) * 0.1
    norms = []
    for temperature in (4.0, 8.0):
        student = (_logits(0) * 0.1).requires_grad_()
        kd_loss(student, teacher, temperature).backward()
        norms.append(student.grad.norm().item())
    assert norms[0] == pytest.approx(norms[1], rel=0.1)


def _batch() -> Batch:
    student = {"start_logits": _logits(0), "end_logits": _logits(2)}
    teacher = {"start_logits": _logits(1), "end_logits": _logits(3)}
    return Batch({}, {}, ModelOutputs(student), ModelOutputs(teacher))


@pytest.mark.parametrize(("task_weight", "kd_weight"), [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.3, 2.0)])
def test_objective_is_the_weighted_sum(tiny_qa_model, task_weight, kd_weight):
    batch, task_loss = _batch(), torch.tensor(3.0)
    config = build_distillation({"task_weight": task_weight, "logit_kd": {"weight": kd_weight}})
    kd = (
        kd_loss(batch.student.logits["start_logits"], batch.teacher.logits["start_logits"], 2.0)
        + kd_loss(batch.student.logits["end_logits"], batch.teacher.logits["end_logits"], 2.0)
    ) / 2
    got = Distiller(config, tiny_qa_model.config).loss(task_loss, batch)
    assert got.item() == pytest.approx(task_weight * 3.0 + kd_weight * kd.item(), rel=1e-6)
    assert Distiller(config, tiny_qa_model.config).needs.teacher == (kd_weight > 0)


class LossRecorder(Method):
    """Records the objective of every step of a real training run (placed after the distiller)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def loss(self, loss: torch.Tensor, batch: Batch) -> torch.Tensor:
        self.losses.append(loss.item())
        return loss


def test_kd_term_receives_the_teachers_logits(tokenizer):
    """Same student, same data, same seed: only the teacher differs, and so does the KD loss; with the
    KD weight at 0 the teacher no longer matters."""
    task = tiny_squad_task(max_seq_length=64, doc_stride=16, max_query_length=24)
    features = task.train_features(tokenizer, list(tokenizer.model_input_names))

    def first_loss(teacher_seed: int, kd_weight: float) -> float:
        student = tiny_bert_model(BertForQuestionAnswering, seed=0)
        teacher = tiny_bert_model(BertForQuestionAnswering, seed=teacher_seed, initializer_range=0.5)
        config = build_distillation({"task_weight": 1.0, "logit_kd": {"weight": kd_weight}})
        recorder = LossRecorder()
        training = TrainingConfig(max_steps=1, batch_size=4, precision="fp32")
        methods = [Distiller(config, teacher.config), recorder]
        train(
            student,
            task,
            features,
            training,
            seed=0,
            methods=methods,
            teacher=LiveTeacher(teacher, task.output_names),
        )
        return recorder.losses[0]

    assert first_loss(1, 1.0) != pytest.approx(first_loss(2, 1.0), rel=1e-3)
    assert first_loss(1, 1.0) == pytest.approx(first_loss(1, 1.0), rel=1e-6)
    assert first_loss(1, 0.0) == pytest.approx(first_loss(2, 0.0), rel=1e-6)
