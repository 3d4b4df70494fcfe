"""Distillation on corrupted batches: which tokens are swapped and for what, the corrupted steps' objective
(the terms alone), and a real training run in which the teacher labels the very copy the student sees."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert_model, tiny_squad_task
from transformers import BertForQuestionAnswering

from fastcpu.config import ConfigError
from fastcpu.distillation import Distiller, build_distillation, kd_loss
from fastcpu.distillation.augmentation import corrupt, special_positions
from fastcpu.methods import Batch, Method, ModelOutputs
from fastcpu.teacher_outputs import CachedTeacher
from fastcpu.training import TrainingConfig, train

NAMES = ("start_logits", "end_logits")


@pytest.fixture(scope="module")
def features(tokenizer):
    task = tiny_squad_task(max_seq_length=64, doc_stride=16, max_query_length=24)
    return task.train_features(tokenizer, list(tokenizer.model_input_names))


def test_special_tokens_are_found_without_the_tokenizer(features, tokenizer):
    ids, mask = features.inputs["input_ids"], features.inputs["attention_mask"]
    named = torch.isin(ids, torch.tensor(tokenizer.all_special_ids)) | (mask == 0)
    assert torch.equal(special_positions(ids, mask), named)


def test_corruption_swaps_about_its_share_of_ordinary_tokens_for_tokens_of_the_batch(features):
    inputs = dict(features.inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    torch.manual_seed(0)
    corrupted = corrupt(inputs, 0.3)
    new = corrupted["input_ids"]
    special = special_positions(ids, mask)
    assert torch.equal(new[special], ids[special])
    assert torch.equal(corrupted["attention_mask"], mask) and torch.equal(ids, features.inputs["input_ids"])
    changed = (new != ids).sum().item() / (~special).sum().item()
    # 30% are drawn; a draw of the same token changes nothing, so the share is a little under 0.3
    assert 0.2 < changed <= 0.32
    assert torch.isin(new[~special], ids[~special]).all()


def _batch() -> Batch:
    logits = {
        name: torch.randn(4, 40, generator=torch.Generator().manual_seed(i)) for i, name in enumerate(NAMES)
    }
    teacher = {
        name: torch.randn(4, 40, generator=torch.Generator().manual_seed(9 + i))
        for i, name in enumerate(NAMES)
    }
    return Batch({}, {}, ModelOutputs(logits), ModelOutputs(teacher))


def test_corrupted_steps_train_on_the_terms_alone(tiny_qa_model):
    config = build_distillation(
        {"task_weight": 0.5, "logit_kd": {"weight": 0.5}, "augmentation": {"every": 3, "replace": 0.2}}
    )
    distiller, batch, task_loss = Distiller(config, tiny_qa_model.config), _batch(), torch.tensor(3.0)
    kd = sum(kd_loss(batch.student.logits[n], batch.teacher.logits[n], 2.0) for n in NAMES) / 2
    plain, corrupted = 0.5 * 3.0 + 0.5 * kd.item(), 0.5 * kd.item()
    expected = [plain, plain, corrupted, plain, plain, corrupted]
    got = []
    for step in range(6):
        distiller.before_step(step)
        got.append(distiller.loss(task_loss, batch).item())
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"task_weight": 1.0, "augmentation": {"every": 2}}, "no term has a weight > 0"),
        (
            {"task_weight": 1.0, "logit_kd": {"weight": 0.0}, "augmentation": {"every": 2}},
            "augmentation.every=0",
        ),
        ({"logit_kd": {}, "augmentation": {"every": -1}}, "augmentation.every"),
        ({"logit_kd": {}, "augmentation": {"replace": 0.0}}, "augmentation.replace"),
        ({"logit_kd": {}, "augmentation": {"rate": 0.5}}, "unknown key"),
    ],
)
def test_bad_augmentation_is_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        build_distillation(settings)


class InputRecorder(Method):
    """Keeps what each step's objective saw: the student's inputs and the teacher's logits."""

    def __init__(self) -> None:
        self.steps: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def loss(self, loss: torch.Tensor, batch: Batch) -> torch.Tensor:
        self.steps.append(({k: v.clone() for k, v in batch.inputs.items()}, batch.teacher.logits))
        return loss


def test_the_teacher_labels_the_corrupted_copy_the_student_trains_on(features, tmp_path):
    """Through the real loop and the teacher-output cache: plain steps read the stored outputs of their
    rows, corrupted steps (every second one) get the teacher's outputs for the corrupted inputs."""
    CachedTeacher._memory.clear()
    teacher_model = tiny_bert_model(BertForQuestionAnswering, seed=1)
    teacher = CachedTeacher(teacher_model, NAMES, features, str(tmp_path), budget_mb=512.0)
    config = build_distillation(
        {"task_weight": 0.5, "logit_kd": {"weight": 0.5}, "augmentation": {"every": 2, "replace": 0.5}}
    )
    recorder = InputRecorder()
    methods = [Distiller(config, teacher_model.config), recorder]
    training = TrainingConfig(max_steps=4, batch_size=4, precision="fp32")
    student = tiny_bert_model(BertForQuestionAnswering, seed=0)
    train(student, tiny_squad_task(), features, training, seed=0, methods=methods, teacher=teacher)
    rows = {tuple(row.tolist()) for row in features.inputs["input_ids"]}
    assert len(recorder.steps) == 4
    for step, (inputs, teacher_logits) in enumerate(recorder.steps):
        length = inputs["input_ids"].shape[1]
        trained_rows = [tuple(row.tolist()) + (0,) * (64 - length) for row in inputs["input_ids"]]
        assert all((row in rows) == (step % 2 == 0) for row in trained_rows)
        with torch.no_grad():
            expected = teacher_model.eval()(**inputs)
        for name in NAMES:
            torch.testing.assert_close(teacher_logits[name], expected[name], atol=1e-4, rtol=1e-4)
