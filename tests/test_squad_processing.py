"""SQuAD windowing, labels, n-best decoding, holdout split, loss and fingerprint with a real tokenizer."""

import json
import shutil
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcpu.tasks import SquadConfig, SquadTask, build_task_config, make_task
from fastcpu.tasks.base import Features
from fastcpu.tasks.squad import parse_squad_json

FIXTURE = str(Path(__file__).parent / "fixtures" / "squad_tiny.json")
SAMPLE = str(files("fastcpu") / "data" / "squad_sample.json")
BERT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def squad(**settings) -> SquadTask:
    task = make_task(build_task_config({"name": "squad", **settings}))
    assert isinstance(task, SquadTask)
    return task


def one_hot(positions: torch.Tensor, length: int) -> np.ndarray:
    logits = np.zeros((len(positions), length), dtype=np.float32)
    logits[np.arange(len(positions)), positions.numpy()] = 1.0
    return logits


@pytest.mark.parametrize(("max_seq_length", "doc_stride"), [(384, 128), (64, 16), (48, 8)])
def test_perfect_logits_recover_every_gold_answer(tokenizer, max_seq_length: int, doc_stride: int) -> None:
    """Train labels and eval decoding must agree: one-hot logits at the labels give EM 100."""
    settings = dict(max_seq_length=max_seq_length, doc_stride=doc_stride, max_query_length=16)
    trainer = squad(train_file=FIXTURE, **settings)
    scorer = squad(eval_file=FIXTURE, max_answer_length=100, **settings)
    train = trainer.train_features(tokenizer, BERT_INPUTS)
    evaluation = scorer.eval_features(tokenizer, BERT_INPUTS)
    assert all(torch.equal(train.inputs[k], evaluation.inputs[k]) for k in BERT_INPUTS)
    windows = np.bincount(evaluation.meta.example_index)
    if max_seq_length < 100:
        assert windows.max() >= 3  # contexts really are split into several windows
    outputs = {
        "start_logits": one_hot(train.labels["start_positions"], max_seq_length),
        "end_logits": one_hot(train.labels["end_positions"], max_seq_length),
    }
    metrics, predictions = scorer.score(outputs, evaluation)
    assert metrics == {"exact_match": 100.0, "f1": 100.0}
    assert set(predictions) == {example.id for example in scorer.examples("eval")}


def test_train_labels_point_at_the_answer_or_cls(tokenizer) -> None:
    task = squad(train_file=FIXTURE, max_seq_length=48, doc_stride=8, max_query_length=16)
    features = task.train_features(tokenizer, BERT_INPUTS)
    starts, ends = features.labels["start_positions"], features.labels["end_positions"]
    assert (starts <= ends).all()
    assert (starts == 0).any() and (starts > 0).any()  # some windows miss the answer, some hold it
    inside = starts > 0
    assert (features.inputs["token_type_ids"][inside, starts[inside]] == 1).all()  # answers are in context


def test_eval_meta_marks_only_context_tokens(tokenizer) -> None:
    features = squad(eval_file=FIXTURE).eval_features(tokenizer, BERT_INPUTS)
    assert features.labels == {}
    rows = zip(*(features.inputs[k][0].tolist() for k in BERT_INPUTS), strict=True)
    expected = [kind == 1 and real == 1 and token != tokenizer.sep_token_id for token, real, kind in rows]
    assert [offset is not None for offset in features.meta.offset_mapping(0)] == expected
    assert any(expected)


def test_no_valid_span_predicts_empty_string(tokenizer) -> None:
    task = squad(eval_file=FIXTURE, n_best_size=1)
    features = task.eval_features(tokenizer, BERT_INPUTS)
    context = features.meta.context_mask
    first = context.argmax(axis=1)
    last = context.shape[1] - 1 - context[:, ::-1].argmax(axis=1)
    start = one_hot(torch.from_numpy(last), context.shape[1])  # best start after best end
    end = one_hot(torch.from_numpy(first), context.shape[1])
    metrics, predictions = task.score({"start_logits": start, "end_logits": end}, features)
    assert set(predictions.values()) == {""}
    assert metrics == {"exact_match": 0.0, "f1": 0.0}


def test_max_answer_length_limits_spans(tokenizer) -> None:
    trainer = squad(train_file=FIXTURE)
    scorer = squad(eval_file=FIXTURE, max_answer_length=1)
    train = trainer.train_features(tokenizer, BERT_INPUTS)
    outputs = {
        "start_logits": one_hot(train.labels["start_positions"], 384),
        "end_logits": one_hot(train.labels["end_positions"], 384),
    }
    metrics, predictions = scorer.score(outputs, scorer.eval_features(tokenizer, BERT_INPUTS))
    assert metrics["exact_match"] < 100
    # each answer is the text of one context token (a word piece such as "rie" of "Curie" may tokenize
    # into two pieces on its own, so the answers are compared with the tokens' own texts)
    one_token = {""}
    for example in (e for article in parse_squad_json(FIXTURE) for e in article):
        offsets = tokenizer(example.context, return_offsets_mapping=True)["offset_mapping"]
        one_token |= {example.context[start:end] for start, end in offsets}
    assert set(predictions.values()) <= one_token


def test_inputs_are_exactly_the_requested_names(tokenizer) -> None:
    names = ["input_ids", "attention_mask"]  # DistilBERT takes no token_type_ids
    features = squad(train_file=FIXTURE, max_train_samples=3).train_features(tokenizer, names)
    assert list(features.inputs) == names
    assert all(t.dtype == torch.int64 and t.shape == (len(features), 384) for t in features.inputs.values())


def test_subset_of_eval_features_still_scores(tokenizer) -> None:
    task = squad(eval_file=FIXTURE, max_seq_length=64, doc_stride=16, max_query_length=16)
    features = task.eval_features(tokenizer, BERT_INPUTS).subset(7)
    assert len(features) == 7 and len(features.meta.example_index) == 7
    zeros = np.zeros((7, 64), dtype=np.float32)
    _, predictions = task.score({"start_logits": zeros, "end_logits": zeros}, features)
    assert len(predictions) == len(set(features.meta.example_index.tolist()))


def test_holdout_splits_articles() -> None:
    task = squad(train_file=FIXTURE, holdout_every=2, holdout_offset=1)
    articles = parse_squad_json(FIXTURE)
    train_ids = {e.id for e in task.examples("train")}
    eval_ids = {e.id for e in task.examples("eval")}
    assert train_ids == {e.id for e in articles[0] + articles[2]}
    assert eval_ids == {e.id for e in articles[1] + articles[3]}


def test_embedded_sample_split_counts() -> None:
    task = squad(train_file=SAMPLE, eval_file=SAMPLE, holdout_every=4, holdout_offset=3)
    assert len(task.examples("train")) == 913
    assert len(task.examples("eval")) == 304
    assert len(json.loads(Path(SAMPLE).read_text())["data"]) == 48


def test_sample_caps_take_questions_in_file_order() -> None:
    task = squad(train_file=FIXTURE, holdout_every=2, max_train_samples=5, max_eval_samples=2)
    articles = parse_squad_json(FIXTURE)
    assert [e.id for e in task.examples("train")] == [e.id for e in articles[1][:5]]
    assert [e.id for e in task.examples("eval")] == [e.id for e in articles[0][:2]]


def test_task_loss_matches_hf() -> None:
    task = squad(train_file=FIXTURE)
    torch.manual_seed(0)
    start, end = torch.randn(3, 10), torch.randn(3, 10)
    positions = torch.tensor([2, 15, -4])  # 15 is ignored, -4 clamps to 0 as in HF's QA heads
    loss = task.task_loss(
        {"start_logits": start, "end_logits": end}, {"start_positions": positions, "end_positions": positions}
    )
    keep = torch.tensor([2, 0])
    expected = (F.cross_entropy(start[[0, 2]], keep) + F.cross_entropy(end[[0, 2]], keep)) / 2
    assert torch.allclose(loss, expected)


def test_model_side() -> None:
    task = squad(train_file=FIXTURE)
    assert task.auto_model_class().__name__ == "AutoModelForQuestionAnswering"
    assert task.model_kwargs() == {}
    assert task.is_tuned(SimpleNamespace(architectures=["BertForQuestionAnswering"]))
    assert not task.is_tuned(SimpleNamespace(architectures=["BertModel"]))
    assert not task.is_tuned(SimpleNamespace(architectures=None))
    assert (task.output_names, task.primary_metric, task.head) == (
        ("start_logits", "end_logits"),
        "f1",
        "question_answering",
    )


def test_fingerprint_tracks_settings_and_data(tmp_path: Path) -> None:
    base = squad(train_file=FIXTURE, holdout_every=2).fingerprint()
    assert base == squad(train_file=FIXTURE, holdout_every=2).fingerprint()
    assert base != squad(train_file=FIXTURE, holdout_every=2, doc_stride=64).fingerprint()
    assert base != squad(train_file=FIXTURE, holdout_every=2, holdout_offset=1).fingerprint()
    moved = tmp_path / "copy.json"
    shutil.copy(FIXTURE, moved)
    assert base == squad(train_file=str(moved), holdout_every=2).fingerprint()  # contents, not paths
    edited = json.loads(moved.read_text())
    edited["data"][0]["paragraphs"][0]["qas"][0]["question"] += " really"
    moved.write_text(json.dumps(edited))
    assert base != squad(train_file=str(moved), holdout_every=2).fingerprint()


def test_config_is_cheap_and_loading_lazy() -> None:
    config = build_task_config({"name": "squad", "train_file": "does/not/exist.json"})
    assert isinstance(config, SquadConfig)
    make_task(config)  # no file access until examples or features are asked for


def test_batches_cover_all_rows_once() -> None:
    rows = torch.arange(10)
    features = Features({"input_ids": rows[:, None].repeat(1, 4)}, {"labels": rows})
    seen = [
        labels["labels"]
        for _, labels in features.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0))
    ]
    assert [len(b) for b in seen] == [4, 4, 2]
    assert sorted(torch.cat(seen).tolist()) == list(range(10))
    assert [len(b["input_ids"]) for b, _ in features.batches(3)] == [3, 3, 3, 1]
    assert features.subset(3).labels["labels"].tolist() == [0, 1, 2]
