"""The deploy-side pipeline and its CLI on tiny real artifacts: raw questions/contexts or texts in,
answers with scores out; batching, long contexts, labels, and bad input refused before compilation.
(That a pipeline answers exactly as its trial scored is checked on real trials in test_trial_e2e.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from runtime_helpers import CLS_TASK, CONTEXTS, QA_TASK, QUESTIONS, save, tiny_runtime_model
from transformers import BertForQuestionAnswering, BertForSequenceClassification

import fastcpu_runtime as rt

# n_best_size spans a whole window, so even a random model finds a valid span for every question.
QA_SETTINGS = {"doc_stride": 16, "max_query_length": 16, "n_best_size": 64, "max_answer_length": 30}
# A context several windows long (64 tokens a window): the answer must be searched in all of them.
LONG_CONTEXT = " ".join(CONTEXTS * 4)


@pytest.fixture(scope="module")
def qa_artifact(tmp_path_factory, tokenizer) -> Path:
    model = tiny_runtime_model(BertForQuestionAnswering, initializer_range=0.2)
    return save(tmp_path_factory.mktemp("qa") / "artifact", model, tokenizer, task=QA_TASK | QA_SETTINGS)


@pytest.fixture(scope="module")
def cls_artifact(tmp_path_factory, tokenizer) -> Path:
    model = tiny_runtime_model(BertForSequenceClassification, initializer_range=0.2)
    model.config.id2label, model.config.label2id = (
        {0: "negative", 1: "positive"},
        {"negative": 0, "positive": 1},
    )
    return save(tmp_path_factory.mktemp("cls") / "artifact", model, tokenizer, task=CLS_TASK)


@pytest.fixture(scope="module")
def qa(qa_artifact) -> rt.Pipeline:
    return rt.load_pipeline(qa_artifact, "eager", batch_size=2)


def test_answers_are_spans_of_their_contexts_with_probabilities(qa) -> None:
    contexts = [*CONTEXTS, LONG_CONTEXT]
    questions = [*QUESTIONS, QUESTIONS[0]]
    answers = qa(questions, contexts)
    assert len(answers) == len(questions)
    for answer, context in zip(answers, contexts, strict=True):
        assert 0 <= answer.start < answer.end <= len(context)
        assert answer.answer == context[answer.start : answer.end] != ""
        assert 0.0 < answer.score <= 1.0


def test_batch_size_changes_nothing_but_the_calls(qa, qa_artifact) -> None:
    """Seven windows in calls of 2 (the last one short) or all in one call: the same answers."""
    questions, contexts = [QUESTIONS[1], *QUESTIONS], [LONG_CONTEXT, *CONTEXTS]
    wide = rt.load_pipeline(qa_artifact, "eager", batch_size=16)
    narrow, whole = qa(questions, contexts), wide(questions, contexts)
    assert [a.answer for a in narrow] == [a.answer for a in whole]
    assert np.allclose([a.score for a in narrow], [a.score for a in whole], atol=1e-5)


def test_predict_takes_and_returns_rows(qa) -> None:
    rows = [{"question": q, "context": c} for q, c in zip(QUESTIONS, CONTEXTS, strict=True)]
    predicted = qa.predict(rows)
    assert predicted == [
        {"answer": a.answer, "score": a.score, "start": a.start, "end": a.end}
        for a in qa(QUESTIONS, CONTEXTS)
    ]
    assert qa.predict([]) == [] and qa([], []) == []
    with pytest.raises(ValueError, match=r"differ in length: \{'question': 2, 'context': 1\}"):
        qa(QUESTIONS[:2], CONTEXTS[:1])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [{"question": "Who?"}],
            r"request 0 lacks \['context'\]; each request has \['question', 'context'\]",
        ),
        ([{"question": "Who?", "context": 3}], r"request 0: \{'context': 'int'\} must be strings"),
        (["Who?"], r"request 0 is a str; each request is an object with \['question', 'context'\]"),
        (
            [{"question": "Who?", "context": "Tesla."}, {"question": "Who?", "context": " "}],
            r"request 1: \['context'\] empty",
        ),
    ],
)
def test_bad_requests_say_what_is_expected(qa, rows, message) -> None:
    with pytest.raises(ValueError, match=message):
        qa.predict(rows)


def test_classification_gives_the_label_names(cls_artifact) -> None:
    pipeline = rt.load_pipeline(cls_artifact, "eager", batch_size=4)
    texts = ["a gripping, beautifully acted film", "dull and far too long", "fine", "I left early", "wow"]
    labels = pipeline(texts)
    assert len(labels) == len(texts)
    assert {label.label for label in labels} <= {"negative", "positive"}
    assert all(0.5 <= label.score <= 1.0 for label in labels)  # the larger of two probabilities
    assert pipeline.predict([{"text": texts[0]}]) == [{"label": labels[0].label, "score": labels[0].score}]


def test_artifact_without_qa_settings_is_refused_before_compiling(tmp_path, tokenizer) -> None:
    model = tiny_runtime_model(BertForQuestionAnswering)
    old = save(tmp_path / "old", model, tokenizer, task=QA_TASK)  # as artifacts were before pipelines
    with pytest.raises(rt.ArtifactError, match=r"records no \['doc_stride', 'max_query_length'.*re-export"):
        rt.load_pipeline(old, "eager")


def test_slow_tokenizer_is_refused_for_question_answering(tmp_path, tokenizer) -> None:
    """Answers are mapped back to the context through offset mappings, which only fast tokenizers give."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    slow = BertTokenizerLegacy.from_pretrained(tokenizer.name_or_path)
    model = tiny_runtime_model(BertForQuestionAnswering)
    artifact = save(tmp_path / "slow", model, slow, task=QA_TASK | QA_SETTINGS)
    with pytest.raises(
        rt.ArtifactError, match=r"BertTokenizerLegacy\) is a slow one without offset mappings"
    ):
        rt.load_pipeline(artifact, "eager")


def test_artifact_missing_its_tokenizer_is_refused(tmp_path, qa_artifact) -> None:
    import shutil

    broken = shutil.copytree(qa_artifact, tmp_path / "broken")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(rt.ArtifactError, match="tokenizer.json"):
        rt.load_pipeline(broken, "eager")


def test_heads_without_a_pipeline_are_refused(tmp_path, tokenizer) -> None:
    model = tiny_runtime_model(BertForQuestionAnswering)
    task = QA_TASK | {"head": "token_classification"}
    artifact = save(tmp_path / "tokens", model, tokenizer, task=task)
    with pytest.raises(rt.ArtifactError, match=r"no pipeline .* 'token_classification'; pipelines exist for"):
        rt.load_pipeline(artifact)


def predict_cli(artifact: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fastcpu_runtime.predict", str(artifact), "--backend", "eager", *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=300)


def test_cli_answers_one_question_or_json_lines(qa, qa_artifact) -> None:
    expected = qa.predict([{"question": q, "context": c} for q, c in zip(QUESTIONS, CONTEXTS, strict=True)])
    one = predict_cli(qa_artifact, "--question", QUESTIONS[0], "--context", CONTEXTS[0])
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout) == pytest.approx(expected[0])
    lines = "\n".join(
        json.dumps({"question": q, "context": c}) for q, c in zip(QUESTIONS, CONTEXTS, strict=True)
    )
    many = predict_cli(qa_artifact, stdin=lines + "\n\n")
    assert many.returncode == 0, many.stderr
    got = [json.loads(line) for line in many.stdout.splitlines()]
    assert [g["answer"] for g in got] == [e["answer"] for e in expected]


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["--text", "hello"], "", "request 0 lacks ['question', 'context']"),
        ([], '{"question": "a", "context": "b"}\nnot json\n', "stdin line 2 is not JSON"),
        (["--batch-size", "0"], "", "--batch-size must be at least 1"),
        (["--buckets", "32", "65"], "", "buckets [65] are outside 1..64"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(qa_artifact, args, stdin, message) -> None:
    done = predict_cli(qa_artifact, *args, stdin=stdin)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""
