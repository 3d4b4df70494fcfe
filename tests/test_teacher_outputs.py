"""The teacher-output cache: the same outputs as a live teacher, a hit for the same teacher and rows, a miss
for anything that changes them, a corrupted file recomputed with one warning, live above the budget."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_bert_model, tiny_squad_task
from transformers import BertForQuestionAnswering

from fastcpu.methods import Needs
from fastcpu.teacher_outputs import CachedTeacher, LiveTeacher
from fastcpu.training import trim_padding

NAMES = ("start_logits", "end_logits")
HIDDEN = Needs(teacher=True, hidden_states=True)
BF16 = torch.autocast("cpu", dtype=torch.bfloat16)
FP32 = torch.autocast("cpu", enabled=False)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def features(tokenizer):
    task = tiny_squad_task(max_seq_length=64, doc_stride=16, max_query_length=24)
    return task.train_features(tokenizer, list(tokenizer.model_input_names))


@pytest.fixture
def cache(tmp_path):
    CachedTeacher._memory.clear()  # every test starts from the disk
    return tmp_path / "cache"


def cached(features, cache, needs=HIDDEN, autocast=BF16, seed=1, budget=512.0) -> CachedTeacher:
    teacher = CachedTeacher(
        tiny_bert_model(BertForQuestionAnswering, seed=seed), NAMES, features, cache, budget
    )
    teacher.prepare(needs, autocast, CPU)
    return teacher


def entries(cache) -> list[str]:
    return sorted(p.name for p in (cache / "outputs").iterdir() if p.is_dir())


def test_cached_outputs_equal_the_live_ones(features, cache):
    teacher = cached(features, cache)
    live = LiveTeacher(teacher.model, NAMES)
    live.prepare(HIDDEN, BF16, CPU)
    rows = torch.tensor([5, 0, 3])
    inputs = {name: tensor[rows] for name, tensor in features.inputs.items()}
    with BF16:
        expected = live(rows, inputs, HIDDEN)
    got = teacher(rows, inputs, HIDDEN)
    for name in NAMES:
        torch.testing.assert_close(got.logits[name], expected.logits[name].float(), atol=2e-2, rtol=2e-2)
    assert len(got.hidden_states) == 3 and got.attentions is None
    for mine, theirs in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(mine.float(), theirs.float(), atol=2e-2, rtol=2e-2)


def test_same_teacher_and_rows_hit_and_anything_else_misses(features, cache, caplog):
    cached(features, cache)
    first = entries(cache)
    CachedTeacher._memory.clear()
    with caplog.at_level(logging.INFO, logger="fastcpu.teacher_outputs"):
        cached(features, cache)
    assert entries(cache) == first and "teacher outputs read from" in caplog.text
    # In this process, the next trial does not even read the disk.
    assert cached(features, cache).stored is cached(features, cache).stored
    cached(features, cache, seed=2)  # other teacher weights
    cached(features.subset(5), cache)  # other training rows
    cached(features, cache, needs=Needs(teacher=True))  # logits only
    cached(features, cache, autocast=FP32)  # other precision
    assert len(entries(cache)) == 5


def test_a_file_that_no_longer_matches_its_checksum_is_recomputed_once(features, cache, caplog):
    good = cached(features, cache).stored
    (entry,) = entries(cache)
    data = cache / "outputs" / entry / "outputs.safetensors"
    data.write_bytes(data.read_bytes()[:-64] + bytes(64))
    CachedTeacher._memory.clear()
    with caplog.at_level(logging.WARNING, logger="fastcpu.teacher_outputs"):
        again = cached(features, cache).stored
        CachedTeacher._memory.clear()
        cached(features, cache)
    assert caplog.text.count("do not match their checksums: recomputing them") == 1
    assert all(torch.equal(good[name], again[name]) for name in good)


def test_outputs_over_the_budget_are_computed_live(features, cache):
    teacher = cached(features, cache, budget=0.001)
    assert teacher.live and not (cache / "outputs").exists()
    rows = torch.tensor([1, 2])
    inputs = {name: tensor[rows] for name, tensor in features.inputs.items()}
    assert teacher(rows, inputs, HIDDEN).hidden_states is not None


def test_cached_outputs_fit_a_batch_trimmed_of_its_padding(features, cache):
    """Training cuts each batch to its longest row; the cache, computed on full rows, gives the same
    outputs as the teacher run on the trimmed batch."""
    teacher = cached(features, cache, autocast=FP32)
    rows = torch.argsort(features.inputs["attention_mask"].sum(1))[:3]  # the shortest rows
    inputs = trim_padding({name: tensor[rows] for name, tensor in features.inputs.items()})
    assert inputs["input_ids"].shape[1] < features.inputs["input_ids"].shape[1]
    live = LiveTeacher(teacher.model, NAMES)
    live.prepare(HIDDEN, FP32, CPU)
    expected, got = live(rows, inputs, HIDDEN), teacher(rows, inputs, HIDDEN)
    real = inputs["attention_mask"].bool()
    for name in NAMES:
        assert got.logits[name].shape == expected.logits[name].shape
        torch.testing.assert_close(got.logits[name][real], expected.logits[name][real], atol=1e-4, rtol=1e-4)
    for mine, theirs in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(mine[real].float(), theirs[real].float(), atol=2e-2, rtol=2e-2)
