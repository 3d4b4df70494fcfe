"""Answer raw requests with a deployed artifact: questions and contexts, or texts, in; answers out.

A pipeline owns one `Session` (fixed batch and sequence shape), or a `BucketedSession` (one per
sequence length, each batch on the shortest that holds it), and the artifact's tokenizer. It tokenizes
as the trial did (`processing`, with the settings the artifact records), runs the windows through the
session in batches of its shape, and decodes: the best span over a question's windows with its
probability, or a label with its probability.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .artifact import Artifact, load_artifact
from .auto import AUTO
from .buckets import BucketedSession, create_bucketed_session
from .errors import ArtifactError
from .processing import QaSettings, best_spans, encode_texts, encode_windows, softmax
from .session import Session, create_session


@dataclass(frozen=True)
class Answer:
    """An extractive answer: `context[start:end]`; empty with start = end = -1 when no span is valid."""

    answer: str
    score: float  # P(start) * P(end) in the window the span came from
    start: int
    end: int


@dataclass(frozen=True)
class Label:
    """A predicted class and its probability."""

    label: str
    score: float


class Pipeline(ABC):
    """Raw requests to predictions with one deployed model; build one with `load_pipeline`."""

    head: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]  # the fields of one request
    outputs: ClassVar[tuple[str, ...]]  # the model outputs decoding reads
    result: ClassVar[type]  # the dataclass each request's prediction is

    def __init__(self, session: Session | BucketedSession, tokenizer: Any) -> None:
        self.session = session
        self.artifact: Artifact = session.artifact
        self.tokenizer = tokenizer

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.session!r})"

    @classmethod
    def check(cls, artifact: Artifact, tokenizer: Any) -> None:
        """Refuse an artifact that lacks what this pipeline needs, before a session is compiled."""
        missing = [name for name in cls.outputs if name not in artifact.output_names]
        if missing:
            raise ArtifactError(
                f"{artifact.path}: a {artifact.head} model must output {list(cls.outputs)}; this one outputs "
                f"{artifact.output_names}"
            )

    @classmethod
    def check_requests(cls, rows: Sequence[Any]) -> None:
        """Each request must map every name in `columns` to a string; say which one does not."""
        for index, row in enumerate(rows):
            if not isinstance(row, Mapping):
                kind = type(row).__name__
                raise ValueError(
                    f"request {index} is a {kind}; each request is an object with {list(cls.columns)}"
                )
            missing = [name for name in cls.columns if name not in row]
            if missing:
                raise ValueError(
                    f"request {index} lacks {missing}; each request has {list(cls.columns)}, got {list(row)}"
                )
            wrong = {name: type(row[name]).__name__ for name in cls.columns if not isinstance(row[name], str)}
            if wrong:
                raise ValueError(f"request {index}: {wrong} must be strings")
            empty = [name for name in cls.columns if not row[name].strip()]
            if empty:
                raise ValueError(f"request {index}: {empty} empty; every field needs text")

    def predict(self, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """One prediction (a dict) per request; each request maps every name in `columns` to a string."""
        self.check_requests(rows)
        columns = [[row[name] for row in rows] for name in self.columns]
        return [asdict(prediction) for prediction in self(*columns)]

    def __call__(self, *columns: Sequence[str]) -> list[Any]:
        """Predictions for parallel lists of request fields, in `columns` order (e.g. questions, contexts)."""
        if len(columns) != len(self.columns):
            raise TypeError(
                f"{type(self).__name__} takes {len(self.columns)} lists: {', '.join(self.columns)}"
            )
        lengths = {name: len(values) for name, values in zip(self.columns, columns, strict=True)}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"the request fields differ in length: {lengths}")
        return self._predict(*columns) if columns[0] else []

    @abstractmethod
    def _predict(self, *columns: Sequence[str]) -> list[Any]:
        """`__call__` for one or more requests."""

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Every output over all rows of `inputs`, in calls of the session's batch size."""
        rows = len(inputs["input_ids"])
        step = self.session.batch_size
        chunks: dict[str, list[np.ndarray]] = {name: [] for name in self.artifact.output_names}
        for start in range(0, rows, step):
            outputs = self.session.run({name: t[start : start + step] for name, t in inputs.items()})
            for name in chunks:
                chunks[name].append(outputs[name].numpy())
        return {name: np.concatenate(parts) for name, parts in chunks.items()}


class QuestionAnsweringPipeline(Pipeline):
    head = "question_answering"
    columns = ("question", "context")
    outputs = ("start_logits", "end_logits")
    result = Answer

    def __init__(self, session: Session | BucketedSession, tokenizer: Any) -> None:
        super().__init__(session, tokenizer)
        self.settings = QaSettings.from_manifest(self.artifact.task)

    @classmethod
    def check(cls, artifact: Artifact, tokenizer: Any) -> None:
        super().check(artifact, tokenizer)
        QaSettings.from_manifest(artifact.task)
        if not getattr(tokenizer, "is_fast", False):
            raise ArtifactError(
                f"{artifact.path}: its tokenizer ({type(tokenizer).__name__}) is a slow one without offset "
                "mappings, which question answering needs to map answers back to the context; save a fast "
                "tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True)) with the model and re-export"
            )

    def _predict(self, questions: Sequence[str], contexts: Sequence[str]) -> list[Answer]:
        names = self.artifact.input_names
        inputs, windows = encode_windows(self.tokenizer, names, questions, contexts, self.settings)
        outputs = self._run(inputs)
        start, end = outputs["start_logits"], outputs["end_logits"]
        spans = best_spans(windows, start, end, self.settings)
        answers = []
        for i, context in enumerate(contexts):
            span = spans.get(i)
            if span is None:
                answers.append(Answer("", 0.0, -1, -1))
                continue
            score = span.probability(start, end, windows.context_mask)
            answers.append(Answer(context[span.start : span.end], score, span.start, span.end))
        return answers


class TextClassificationPipeline(Pipeline):
    head = "sequence_classification"
    columns = ("text",)
    outputs = ("logits",)
    result = Label

    def __init__(self, session: Session | BucketedSession, tokenizer: Any) -> None:
        super().__init__(session, tokenizer)
        id2label = self.artifact.model_config.get("id2label") or {}
        self.labels = {int(index): str(name) for index, name in id2label.items()}

    def _predict(self, texts: Sequence[str]) -> list[Label]:
        inputs = encode_texts(self.tokenizer, self.artifact.input_names, texts, self.artifact.max_seq_length)
        probabilities = softmax(self._run(inputs)["logits"])
        best = probabilities.argmax(axis=1)
        return [
            Label(self.labels.get(int(k), str(int(k))), float(p[k]))
            for k, p in zip(best, probabilities, strict=True)
        ]


PIPELINES: dict[str, type[Pipeline]] = {
    cls.head: cls for cls in (QuestionAnsweringPipeline, TextClassificationPipeline)
}


def pipeline_class(artifact: Artifact) -> type[Pipeline]:
    """The pipeline for the artifact's task head."""
    kind = PIPELINES.get(artifact.head)
    if kind is None:
        raise ArtifactError(
            f"{artifact.path}: no pipeline answers requests for head {artifact.head!r}; pipelines exist for "
            f"{sorted(PIPELINES)}"
        )
    return kind


def load_pipeline(
    artifact: Artifact | str | os.PathLike[str],
    backend: str = AUTO,
    *,
    batch_size: int = 8,
    buckets: Sequence[int] = (),
    threads: int | None = None,
) -> Pipeline:
    """The pipeline for the artifact's task head on `backend`; `batch_size` windows (QA) or texts run per
    call, at the artifact's sequence length, or with `buckets` (lengths up to it) at the shortest bucket
    that holds the call's tokens (every session is compiled here)."""
    if not isinstance(artifact, Artifact):
        artifact = load_artifact(artifact)
    kind = pipeline_class(artifact)
    tokenizer = artifact.tokenizer()
    kind.check(artifact, tokenizer)  # before the session compiles
    session: Session | BucketedSession
    if buckets:
        session = create_bucketed_session(
            artifact, backend, batch_size=batch_size, buckets=buckets, threads=threads
        )
    else:
        session = create_session(
            artifact, backend, batch_size=batch_size, seq_len=artifact.max_seq_length, threads=threads
        )
    return kind(session, tokenizer)
