"""Student layer selection and the teacher's loading errors and cache."""

from __future__ import annotations

import pytest
import torch
from conftest import MINILM, tiny_squad_task
from transformers import AutoTokenizer

from fastcpu.config import ConfigError
from fastcpu.student import StudentConfig, make_student
from fastcpu.teacher import (
    Teacher,
    TeacherConfig,
    TeacherError,
    load_model_config,
    prepare_teacher,
    resolve_source,
    score_teacher,
)
from fastcpu.trial import check_teacher_score


def test_student_keeps_the_chosen_teacher_layers(tiny_qa_model):
    teacher = tiny_qa_model
    teacher.config.num_hidden_layers = 2
    student = make_student(teacher, StudentConfig(layers=[1]))
    assert student.config.num_hidden_layers == 1 and len(student.bert.encoder.layer) == 1
    torch.testing.assert_close(
        student.bert.encoder.layer[0].attention.self.query.weight,
        teacher.bert.encoder.layer[1].attention.self.query.weight,
    )
    assert len(teacher.bert.encoder.layer) == 2  # the teacher is untouched
    student.bert.encoder.layer[0].attention.self.query.weight.data.zero_()
    assert teacher.bert.encoder.layer[1].attention.self.query.weight.abs().sum() > 0


def test_student_layer_out_of_range(tiny_qa_model):
    with pytest.raises(
        ConfigError, match=r"student.layers=\[0, 5\]: \[5\] out of range; the teacher has layers 0..1"
    ):
        make_student(tiny_qa_model, StudentConfig(layers=[0, 5]))


def test_teacher_path_that_does_not_exist(tmp_path):
    with pytest.raises(TeacherError, match="no such directory"):
        resolve_source(str(tmp_path / "missing-model"))


def test_teacher_path_that_is_a_file(tmp_path):
    file = tmp_path / "model.bin"
    file.write_bytes(b"x")
    with pytest.raises(TeacherError, match="is a file"):
        resolve_source(str(file))


def test_hub_id_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherError, match="neither a local model directory nor a model id the hub served"):
        load_model_config(resolve_source("someone/not-a-cached-model"))


def test_local_model_loads():
    assert load_model_config(resolve_source(str(MINILM))).num_hidden_layers == 6


def test_tuned_teacher_is_scored_once_and_not_fine_tuned(tmp_path, tiny_qa_model, tokenizer):
    tiny_qa_model.save_pretrained(tmp_path / "tuned")
    tokenizer.save_pretrained(tmp_path / "tuned")
    task = tiny_squad_task(max_seq_length=64, doc_stride=16, max_query_length=24)
    config = TeacherConfig(model=str(tmp_path / "tuned"), finetune="auto", cache_dir=str(tmp_path / "cache"))
    teacher = prepare_teacher(config, task, seed=0)
    assert not teacher.finetuned and set(teacher.metrics) == {"exact_match", "f1"}
    (score_file,) = (tmp_path / "cache" / "scores").iterdir()
    assert not (tmp_path / "cache" / "teachers").exists()
    score_file.write_text('{"exact_match": 1.0, "f1": 2.0}')  # a second call must read, not recompute
    assert prepare_teacher(config, task, seed=0).metrics == {"exact_match": 1.0, "f1": 2.0}


def test_untuned_teacher_with_finetune_never(tmp_path):
    task = tiny_squad_task(max_seq_length=64, doc_stride=16, max_query_length=24)
    with pytest.raises(ConfigError, match="teacher.finetune=never, but .* has no question_answering head"):
        prepare_teacher(
            TeacherConfig(model=str(MINILM), finetune="never", cache_dir=str(tmp_path)), task, seed=0
        )


def test_a_teacher_that_scores_zero_is_an_error_not_a_zero_drop(tiny_qa_model):
    """A teacher whose QA head is all zeros predicts the empty span everywhere: F1 0, refused."""
    task = tiny_squad_task(max_seq_length=64, doc_stride=16, max_query_length=24)
    with torch.no_grad():
        tiny_qa_model.qa_outputs.weight.zero_()
        tiny_qa_model.qa_outputs.bias.zero_()
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    metrics = score_teacher(tiny_qa_model, tokenizer, task, TeacherConfig(model=str(MINILM)))
    assert metrics["f1"] == 0.0
    teacher = Teacher(tiny_qa_model, tokenizer, metrics, "zero-head", finetuned=False)
    with pytest.raises(TeacherError, match="scores f1=0.0 on the evaluation set: its head does not solve"):
        check_teacher_score(teacher, task)
    check_teacher_score(Teacher(tiny_qa_model, tokenizer, {"f1": 12.5}, "ok", finetuned=False), task)
