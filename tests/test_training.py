"""The training loop is seeded: the same seed gives the same weights, another seed does not."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert_config, tiny_squad_task
from transformers import BertForQuestionAnswering

from fastcpu.distillation import Distiller, build_distillation
from fastcpu.pruning import MagnitudePruning, make_pruner
from fastcpu.teacher_outputs import LiveTeacher
from fastcpu.training import TrainingConfig, train


@pytest.fixture(scope="module")
def setup(tokenizer):
    task = tiny_squad_task(max_seq_length=64, doc_stride=16, max_query_length=24)
    return task, task.train_features(tokenizer, list(tokenizer.model_input_names))


def distil_once(setup, seed: int) -> tuple[dict, dict]:
    task, features = setup
    torch.manual_seed(123)  # same initial weights every time; only the training seed varies
    teacher = BertForQuestionAnswering(tiny_bert_config()).eval()
    student = BertForQuestionAnswering(tiny_bert_config())
    config = TrainingConfig(max_steps=5, batch_size=4, precision="bf16")
    distillation = build_distillation({"task_weight": 0.5, "logit_kd": {"weight": 0.5}})
    methods = [
        make_pruner(MagnitudePruning(sparsity=0.5, end=0.5, frequency=1), 5),
        Distiller(distillation, teacher.config),
    ]
    trained = train(
        student,
        task,
        features,
        config,
        seed=seed,
        methods=methods,
        teacher=LiveTeacher(teacher, task.output_names),
    )
    return student.state_dict(), trained.summary


def test_same_seed_same_weights(setup):
    first, first_summary = distil_once(setup, seed=7)
    again, again_summary = distil_once(setup, seed=7)
    other, _ = distil_once(setup, seed=8)
    assert first_summary == again_summary
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
