"""Every encoder family a user brings, end to end through the real command: a tiny random model of each
family with a tokenizer of its kind (tests/families.py) as the teacher, distilled into a 2-layer
student, pruned, int8-quantized, exported, measured on the runtime, and answered by the deploy-side
pipeline exactly as the trial scored it. Question answering runs 4x1 pruning on the sparse backend (the
race `auto` runs is tested in test_runtime_auto.py); classification runs structured pruning, whose
compacted artifact then runs on every int8 backend (their fp32 variants export the same graph)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FIXTURES, MINILM
from families import FAMILIES, save_tiny_family_model
from test_trial_e2e import TINY_TRIAL, assert_scores_are_the_predictions, run_fastcpu
from transformers import AutoModelForSequenceClassification

import fastcpu_runtime as rt
from fastcpu.tasks.sst2 import parse_tsv
from fastcpu_runtime.architectures import LAYER_MAPS
from fastcpu_runtime.compare import accuracy_inputs, eager_reference, logits_cosine, run_rows

STUDENT = ["student.layers=[0,2]", "tracking=off"]  # ModernBERT's layer 0 is special: keep it
# A random tiny teacher cannot generalise to a new article, and a teacher scoring 0 is refused: it learns
# the evaluation article by heart (its 6 questions), which takes a few seconds.
MEMORIZING_TEACHER = ["teacher.training.max_steps=60", "teacher.training.learning_rate=2e-3"]
# 4x1-pruned students run on the sparse kernels where they build (x86 with a C++ compiler)
QA_BACKEND = "sparse" if "sparse" in rt.available_backends() else "auto"
SST2_TRIAL = [
    "+experiment=sst2",
    "~search",
    f"task.train_file={FIXTURES / 'sst2_tiny_train.tsv'}",
    f"task.eval_file={FIXTURES / 'sst2_tiny.tsv'}",
    "task.max_seq_length=48",
    "training.max_steps=6",
    "pruning=structured",  # heads and FFN neurons cut out: each family's compaction, rebuilt by the runtime
    "pruning.frequency=1",
    "quantization.calibration_samples=8",
    "runtime=eager",  # the compiled backends run the artifact below, in this process
    "runtime.batch_size=8",
    "runtime.warmup=1",
    "runtime.rounds=2",
    "runtime.iterations=2",
]


def test_every_family_has_a_layer_map():
    assert set(FAMILIES) == set(LAYER_MAPS)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    """Headless models, as a user brings a pretrained encoder to fine-tune first."""
    root = tmp_path_factory.mktemp("families")
    return {family: save_tiny_family_model(family, root / family, MINILM) for family in FAMILIES}


@pytest.fixture(scope="module")
def classifier_dirs(tmp_path_factory) -> dict[str, Path]:
    """Models with a 2-label classification head, as a user brings a fine-tuned classifier: scored as
    the teacher, not trained (its random head is right about half of the time)."""
    root = tmp_path_factory.mktemp("classifiers")
    return {
        family: save_tiny_family_model(
            family, root / family, MINILM, AutoModelForSequenceClassification, num_labels=2
        )
        for family in FAMILIES
    }


@pytest.fixture(scope="module")
def squad_files(tmp_path_factory) -> list[str]:
    """Overrides for training and evaluating on the last fixture article (two files: the task refuses one
    file for both without a split)."""
    root = tmp_path_factory.mktemp("squad")
    data = json.loads((FIXTURES / "squad_tiny.json").read_text())
    for split in ("train", "eval"):
        (root / f"{split}.json").write_text(json.dumps(data | {"data": data["data"][3:]}))
    files = [f"task.train_file={root / 'train.json'}", f"task.eval_file={root / 'eval.json'}"]
    return [*files, "task.holdout_every=null", "task.holdout_offset=0"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_question_answering_trial_on_each_family(family, family_dirs, squad_files, tmp_path):
    """4x1 pruning to 80% with reconstruction and TinyBERT distillation (the experiment's recipe),
    measured on the sparse kernels (where they build), which each family's layer map feeds."""
    teacher = [*MEMORIZING_TEACHER, f"teacher.model={family_dirs[family]}", f"runtime={QA_BACKEND}"]
    done = run_fastcpu(tmp_path, [*TINY_TRIAL, *squad_files, *STUDENT, *teacher], "qa")
    assert done.returncode == 0, done.stderr[-4000:]
    out = tmp_path / "qa"
    result = json.loads((out / "result.json").read_text())
    predictions = json.loads((out / "predictions.json").read_text())
    assert_scores_are_the_predictions(result, predictions)
    assert result["sparsity"] == pytest.approx(0.8, abs=0.02)
    assert len(result["sparsity_per_layer"]) == 2 * len(LAYER_MAPS[family].stages[0]) + 6
    article = json.loads((FIXTURES / "squad_tiny.json").read_text())["data"][3]
    rows = [(qa["id"], qa["question"], p["context"]) for p in article["paragraphs"] for qa in p["qas"]]
    pipeline = rt.load_pipeline(out / "artifact", QA_BACKEND, batch_size=4)  # the backend the trial measured
    answers = pipeline([question for _, question, _ in rows], [context for *_, context in rows])
    assert {qid: answer.answer for (qid, _, _), answer in zip(rows, answers, strict=True)} == predictions


@pytest.mark.parametrize("family", FAMILIES)
def test_a_classification_trial_on_each_family(family, classifier_dirs, tmp_path):
    """Structured pruning: the student's heads and FFN neurons are cut out of its weights."""
    done = run_fastcpu(tmp_path, [*SST2_TRIAL, *STUDENT, f"teacher.model={classifier_dirs[family]}"], "sst2")
    assert done.returncode == 0, done.stderr[-4000:]
    out = tmp_path / "sst2"
    result = json.loads((out / "result.json").read_text())
    predictions = json.loads((out / "predictions.json").read_text())
    assert result["teacher_accuracy"] > 0
    pruning = json.loads((out / "artifact" / "manifest.json").read_text())["sparsity"]
    assert pruning["heads_per_layer"] == [3, 3] and pruning["ffn_per_layer"] == [64, 64]
    pipeline = rt.load_pipeline(out / "artifact", "eager", batch_size=8)  # the backend the trial measured
    names = {name: index for index, name in pipeline.labels.items()}
    texts = [example.text for example in parse_tsv(str(FIXTURES / "sst2_tiny.tsv"), "sentence", "label")]
    assert [names[label.label] for label in pipeline(texts)] == [predictions[str(i)] for i in range(40)]
    assert_backends_follow_eager(rt.load_artifact(out / "artifact"))


def assert_backends_follow_eager(artifact: rt.Artifact) -> None:
    """Each compiled int8 backend that runs on this machine gives the eager fp32 logits of the same int8
    weights (the trial measured the artifact on eager)."""
    inputs = accuracy_inputs(artifact, seq_len=48)
    reference = eager_reference(artifact, inputs)
    for backend in sorted(b for b in rt.available_backends() if b != "eager" and not b.endswith("_fp32")):
        session = rt.create_session(artifact, backend, batch_size=4, seq_len=48)
        real_tokens = inputs["input_ids"] != artifact.pad_token_id
        assert logits_cosine(run_rows(session, inputs), reference, real_tokens) > 0.99, backend
