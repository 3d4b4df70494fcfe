"""Export -> load -> run parity with the training-time model, on real MiniLM weights and real text:
fp32 within 1e-4, int8 logits cosine >= 0.99, structured compaction exact."""

from __future__ import annotations

import pytest
import torch
from conftest import MINILM, tiny_squad_task
from transformers import AutoModelForQuestionAnswering

import fastcpu_runtime as rt
from fastcpu.export import export_artifact
from fastcpu.pruning import MagnitudePruning, StructuredPruning, make_pruner
from fastcpu.quantization import SCHEMES, make_quantizer
from fastcpu.student import StudentConfig, make_student
from fastcpu.training import TrainingConfig, train

SEQ = 128


@pytest.fixture(scope="module")
def task():
    return tiny_squad_task(max_seq_length=SEQ, doc_stride=48)


@pytest.fixture(scope="module")
def features(task, tokenizer):
    names = list(tokenizer.model_input_names)
    return task.train_features(tokenizer, names), task.eval_features(tokenizer, names)


def student_for(scheme: str, pruning, task, features) -> torch.nn.Module:
    """A 2-layer MiniLM student trained a few steps (so its QA head is not random), pruned and
    prepared exactly as a trial does it."""
    torch.manual_seed(0)
    teacher = AutoModelForQuestionAnswering.from_pretrained(MINILM, attn_implementation="sdpa")
    student = make_student(teacher, StudentConfig(layers=[0, 3]))
    calibration = {"calibration_samples": 16} if scheme in ("static_int8", "qat_int8") else {}
    rounding = {"start": 0.5} if scheme == "qat_int8" else {}  # float first, then through int8 rounding
    quantization = SCHEMES.build({"scheme": scheme, **calibration, **rounding})
    config = TrainingConfig(max_steps=8, batch_size=8, learning_rate=3e-4, precision="fp32")
    steps = config.total_steps(len(features[0]))
    methods = [make_pruner(pruning, steps), make_quantizer(quantization, steps)]
    records = train(student, task, features[0], config, seed=0, methods=methods).records
    return student, quantization, records  # (pruning's record, quantization's record)


def export_and_session(tmp_path, student, quantization, records, task, features, tokenizer, backend):
    pruned, quantized = records
    path = export_artifact(
        tmp_path / "artifact", student, tokenizer, task, quantization, pruned, features[0], SEQ, quantized
    )
    return rt.create_session(rt.load_artifact(path), backend, batch_size=8, seq_len=SEQ)


def outputs_of(run, eval_features) -> torch.Tensor:
    inputs, _ = next(eval_features.batches(8))
    out = run(inputs)
    return torch.cat([out["start_logits"].flatten(), out["end_logits"].flatten()]), inputs


def reference(student, eval_features) -> torch.Tensor:
    inputs, _ = next(eval_features.batches(8))
    with torch.no_grad():
        out = student(**inputs)
    return torch.cat([out.start_logits.flatten(), out.end_logits.flatten()])


@pytest.mark.parametrize(
    "pruning",
    [
        MagnitudePruning(sparsity=0.8, pattern="4x1", end=0.5, frequency=1),
        StructuredPruning(heads=0.25, ffn=0.5, end=0.5, frequency=1),
    ],
    ids=["4x1", "structured"],
)
def test_fp32_export_runs_like_the_training_model(tmp_path, task, features, tokenizer, pruning):
    student, quantization, info = student_for("none", pruning, task, features)
    session = export_and_session(tmp_path, student, quantization, info, task, features, tokenizer, "eager")
    got, _ = outputs_of(session.run, features[1])
    torch.testing.assert_close(got, reference(student, features[1]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme", ["static_int8", "qat_int8", "dynamic_int8"])
def test_int8_export_on_native_keeps_the_logits(tmp_path, task, features, tokenizer, scheme):
    pruning = MagnitudePruning(sparsity=0.5, pattern="4x1", end=0.5, frequency=1)
    student, quantization, info = student_for(scheme, pruning, task, features)
    session = export_and_session(tmp_path, student, quantization, info, task, features, tokenizer, "native")
    assert "int8" in session.description
    assert ("ranges learned in training" in session.description) == (scheme == "qat_int8")
    got, _ = outputs_of(session.run, features[1])
    expected = reference(student, features[1])
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=0).item()
    assert cosine >= 0.99, cosine
    assert not torch.allclose(got, expected, atol=1e-4)  # it really ran in int8


def test_qat_ranges_reach_the_artifact_and_the_sparse_backend_uses_them(tmp_path, task, features, tokenizer):
    pruning = MagnitudePruning(sparsity=0.8, pattern="4x1", end=0.5, frequency=1)
    student, quantization, info = student_for("qat_int8", pruning, task, features)
    session = export_and_session(tmp_path, student, quantization, info, task, features, tokenizer, "sparse")
    artifact = rt.load_artifact(tmp_path / "artifact")
    ranges = artifact.activation_ranges
    assert set(ranges) == set(artifact.quantized_modules) and all(lo < 0 < hi for lo, hi in ranges.values())
    assert "ranges learned in training" in session.description
    got, _ = outputs_of(session.run, features[1])
    cosine = torch.nn.functional.cosine_similarity(got, reference(student, features[1]), dim=0).item()
    assert cosine >= 0.99, cosine
