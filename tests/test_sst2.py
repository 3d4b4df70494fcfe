"""SST-2 loading, features, scoring, loss and fingerprint with a real tokenizer."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcpu.tasks import Sst2Config, Sst2Task, build_task_config, make_task

FIXTURE = str(Path(__file__).parent / "fixtures" / "sst2_tiny.tsv")


def sst2(**settings) -> Sst2Task:
    task = make_task(build_task_config({"name": "sst2", **settings}))
    assert isinstance(task, Sst2Task)
    return task


def test_registry_builds_the_sst2_config() -> None:
    config = build_task_config({"name": "sst2", "train_file": FIXTURE})
    assert isinstance(config, Sst2Config) and config.max_seq_length == 128


def test_reads_the_tsv() -> None:
    examples = sst2(train_file=FIXTURE).examples("train")
    assert len(examples) == 40
    assert sum(e.label for e in examples) == 18
    assert examples[0].text.startswith("it 's a charming and often affecting journey")


def test_columns_are_found_by_name(tmp_path: Path) -> None:
    path = tmp_path / "reordered.tsv"
    path.write_text("id\tlabel\ttext\n7\t1\tgreat fun\n8\t0\tdull\n")
    examples = sst2(train_file=str(path), text_column="text").examples("train")
    assert [(e.text, e.label) for e in examples] == [("great fun", 1), ("dull", 0)]


def test_features_and_perfect_scores(tokenizer) -> None:
    task = sst2(eval_file=FIXTURE, max_seq_length=32)
    features = task.eval_features(tokenizer, ["input_ids", "attention_mask"])
    assert list(features.inputs) == ["input_ids", "attention_mask"]
    assert features.inputs["input_ids"].shape == (40, 32)
    gold = features.labels["labels"]
    right = np.eye(2, dtype=np.float32)[gold.numpy()]
    metrics, predictions = task.score({"logits": right}, features)
    assert metrics == {"accuracy": 100.0}
    assert predictions == {str(i): int(label) for i, label in enumerate(gold)}
    metrics, _ = task.score({"logits": 1 - right}, features)
    assert metrics == {"accuracy": 0.0}


def test_train_features_carry_labels_and_caps(tokenizer) -> None:
    features = sst2(train_file=FIXTURE, max_train_samples=5).train_features(
        tokenizer, ["input_ids", "attention_mask", "token_type_ids"]
    )
    assert len(features) == 5 and features.labels["labels"].tolist() == [1, 0, 1, 1, 0]
    assert features.subset(2).labels["labels"].tolist() == [1, 0]


def test_score_rejects_misaligned_outputs(tokenizer) -> None:
    task = sst2(eval_file=FIXTURE, max_seq_length=16)
    features = task.eval_features(tokenizer, ["input_ids"])
    with pytest.raises(ValueError, match="rows"):
        task.score({"logits": np.zeros((3, 2))}, features)
    with pytest.raises(ValueError, match="lack"):
        task.score({"start_logits": np.zeros((40, 2))}, features)


def test_loss_and_model_side() -> None:
    task = sst2(train_file=FIXTURE)
    logits, labels = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    assert torch.allclose(
        task.task_loss({"logits": logits}, {"labels": labels}), F.cross_entropy(logits, labels)
    )
    assert task.model_kwargs() == {"num_labels": 2}
    assert task.auto_model_class().__name__ == "AutoModelForSequenceClassification"
    tuned = SimpleNamespace(architectures=["BertForSequenceClassification"], num_labels=2)
    assert task.is_tuned(tuned)
    assert not task.is_tuned(SimpleNamespace(architectures=["BertForSequenceClassification"], num_labels=3))
    assert not task.is_tuned(SimpleNamespace(architectures=["BertForQuestionAnswering"], num_labels=2))


def test_fingerprint_tracks_settings_and_data(tmp_path: Path) -> None:
    base = sst2(train_file=FIXTURE).fingerprint()
    assert base == sst2(train_file=FIXTURE).fingerprint()
    assert base != sst2(train_file=FIXTURE, max_seq_length=64).fingerprint()
    assert base != sst2(train_file=FIXTURE, max_train_samples=10).fingerprint()
    copy = tmp_path / "copy.tsv"
    shutil.copy(FIXTURE, copy)
    assert base == sst2(train_file=str(copy)).fingerprint()
    copy.write_text(copy.read_text().replace("\t1\n", "\t0\n", 1))
    assert base != sst2(train_file=str(copy)).fingerprint()
