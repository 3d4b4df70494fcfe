"""TinyBERT distillation: the layer map, projections for a narrower and shallower student, losses that are
zero for a student equal to its teacher and train the projections, and the errors for maps and heads that
do not fit the models."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert_model
from transformers import BertForQuestionAnswering

from fastcpu.config import ConfigError
from fastcpu.distillation import TinyBertDistillation, TinyBertDistiller, uniform_layer_map
from fastcpu.methods import Batch, Needs, model_outputs, request_attention_maps

NAMES = ("start_logits", "end_logits")


def inputs() -> dict[str, torch.Tensor]:
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 12:] = 0  # padding must not count
    return {
        "input_ids": torch.randint(1000, 2000, (3, 20), generator=torch.Generator().manual_seed(0)),
        "attention_mask": mask,
    }


def batch_of(student: torch.nn.Module, teacher: torch.nn.Module, needs: Needs) -> Batch:
    for model in (student, teacher):
        request_attention_maps(model, "test")
    batch_inputs = inputs()
    with torch.no_grad():
        teacher_out = model_outputs(teacher, batch_inputs, NAMES, needs)
    return Batch(batch_inputs, {}, model_outputs(student, batch_inputs, NAMES, needs), teacher_out)


def test_uniform_layer_map_ends_on_the_last_teacher_layer():
    assert uniform_layer_map(3, 6) == [2, 4, 6]
    assert uniform_layer_map(2, 6) == [3, 6]
    assert uniform_layer_map(6, 6) == [1, 2, 3, 4, 5, 6]
    assert uniform_layer_map(1, 12) == [12]


def test_narrower_shallower_student_learns_through_projections():
    teacher = tiny_bert_model(BertForQuestionAnswering, seed=1, num_hidden_layers=4)
    student = tiny_bert_model(BertForQuestionAnswering, seed=2, hidden_size=32, intermediate_size=64)
    term = TinyBertDistiller(TinyBertDistillation(name="tinybert"), teacher.config)
    term.prepare(student)
    assert term.layer_map == [2, 4]
    assert {name: tuple(p.weight.shape) for name, p in term.projections.items()} == {
        "hidden": (64, 32),
        "embedding": (64, 32),
    }
    student.train()
    loss = term.term_loss(batch_of(student, teacher, term.needs))
    assert loss.item() > 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.parameters())
    assert student.bert.encoder.layer[1].output.dense.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("part", ["hidden_weight", "attention_weight", "embedding_weight"])
def test_each_part_is_zero_for_a_student_equal_to_its_teacher_and_positive_otherwise(part):
    teacher = tiny_bert_model(BertForQuestionAnswering, seed=1)
    weights = {
        name: float(name == part) for name in ("hidden_weight", "attention_weight", "embedding_weight")
    }
    config = TinyBertDistillation(name="tinybert", layer_map=[1, 2], **weights)
    term = TinyBertDistiller(config, teacher.config)
    term.prepare(teacher)
    assert not term.projections  # same width: no projection
    assert term.term_loss(batch_of(teacher, teacher, term.needs)).item() == pytest.approx(0.0, abs=1e-6)
    other = tiny_bert_model(BertForQuestionAnswering, seed=3)
    assert term.term_loss(batch_of(other, teacher, term.needs)).item() > 1e-4


def test_padding_tokens_do_not_count():
    teacher = tiny_bert_model(BertForQuestionAnswering, seed=1)
    student = tiny_bert_model(BertForQuestionAnswering, seed=2)
    config = TinyBertDistillation(name="tinybert", attention_weight=0.0, embedding_weight=0.0)
    term = TinyBertDistiller(config, teacher.config)
    term.prepare(student)
    batch = batch_of(student, teacher, term.needs)
    before = term.term_loss(batch).item()
    for states in batch.student.hidden_states:
        states[1, 12:] += 100.0  # change only padding positions
    assert term.term_loss(batch).item() == pytest.approx(before, rel=1e-6)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"layer_map": [1, 9]}, "[9] not teacher layers; the teacher has layers 1..2"),
        ({"layer_map": [0, 2]}, "[0] not teacher layers"),
        ({"layer_map": [2]}, "names 1 layers, but the student has 2"),
    ],
)
def test_a_layer_map_the_models_do_not_have_is_refused(settings, message):
    teacher = tiny_bert_model(BertForQuestionAnswering, seed=1)
    term = TinyBertDistiller(TinyBertDistillation(name="tinybert", **settings), teacher.config)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        term.prepare(tiny_bert_model(BertForQuestionAnswering, seed=2))


def test_attention_distillation_needs_as_many_heads():
    teacher = tiny_bert_model(BertForQuestionAnswering, seed=1)
    student = tiny_bert_model(BertForQuestionAnswering, seed=2, num_attention_heads=2)
    term = TinyBertDistiller(TinyBertDistillation(name="tinybert"), teacher.config)
    with pytest.raises(
        ConfigError, match="as many heads in the student as in the teacher; they have 2 and 4"
    ):
        term.prepare(student)
    no_attention = TinyBertDistillation(name="tinybert", attention_weight=0.0)
    TinyBertDistiller(no_attention, teacher.config).prepare(student)  # hidden states need no heads


def test_all_zero_parts_are_refused():
    with pytest.raises(
        ConfigError, match="hidden_weight, attention_weight and embedding_weight are all zero"
    ):
        TinyBertDistillation(
            name="tinybert", hidden_weight=0, attention_weight=0, embedding_weight=0
        ).validate("distillation.tinybert")
