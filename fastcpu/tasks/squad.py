"""SQuAD v1.1 extractive question answering: loading, run_qa-style windowing, n-best decoding, EM/F1.

Long contexts are split into overlapping windows (features); training labels point at the answer's
tokens in the window that holds it, and evaluation picks the best span over all of a question's windows.
Windowing and span decoding live deploy-side (`fastcpu_runtime.processing`), so a served model answers
exactly as its trial scored it.
"""

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastcpu.config import ConfigError, check_range
from fastcpu.tasks.base import (
    TASKS,
    DataConfig,
    DataError,
    Features,
    Task,
    check_outputs,
    position_cross_entropy,
    read_text,
    require_columns,
    same_file,
)
from fastcpu.tasks.squad_metrics import squad_evaluate
from fastcpu_runtime.processing import QaSettings, WindowError, Windows, best_spans, encode_windows

DATASET_COLUMNS = ("id", "title", "context", "question", "answers")


@dataclass
class SquadConfig(DataConfig):
    name: str = "squad"
    holdout_every: int | None = None
    holdout_offset: int = 0
    max_seq_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64
    n_best_size: int = 20
    max_answer_length: int = 30

    def qa_settings(self) -> QaSettings:
        """The windowing and decoding settings, as the deployed artifact records them."""
        return QaSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(QaSettings)})

    def validate(self, key: str) -> None:
        super().validate(key)
        stride_key = f"{key}.doc_stride"
        check_range(stride_key, self.doc_stride, 0, self.max_seq_length, low_open=True, high_open=True)
        check_range(f"{key}.max_query_length", self.max_query_length, 1, self.max_seq_length, high_open=True)
        check_range(f"{key}.n_best_size", self.n_best_size, 1)
        check_range(f"{key}.max_answer_length", self.max_answer_length, 1)
        if self.holdout_every is None:
            self._validate_no_holdout(key)
        else:
            self._validate_holdout(key)

    def _validate_no_holdout(self, key: str) -> None:
        if self.holdout_offset != 0:
            raise ConfigError(f"{key}.holdout_offset is set but {key}.holdout_every is null")
        if same_file(self.train_file, self.eval_file):
            raise ConfigError(
                f"{key}.train_file and {key}.eval_file are the same file ({self.train_file}); set "
                f"{key}.holdout_every to split it by article, or use different files"
            )

    def _validate_holdout(self, key: str) -> None:
        check_range(f"{key}.holdout_every", self.holdout_every, 2)
        check_range(f"{key}.holdout_offset", self.holdout_offset, 0, self.holdout_every, high_open=True)
        files = {f for f in (self.train_file, self.eval_file) if f is not None}
        if len(files) != 1:
            raise ConfigError(
                f"{key}.holdout_every splits one local file by article: set {key}.train_file and leave "
                f"{key}.eval_file null or equal to it (got train_file={self.train_file!r}, "
                f"eval_file={self.eval_file!r})"
            )


@dataclass
class SquadExample:
    id: str
    title: str
    context: str
    question: str
    answers: list[str]
    answer_starts: list[int]


class _Malformed(Exception):
    """A structural problem at a JSON path; `parse_squad_json` prefixes the file name."""


def _field(node: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(node, dict):
        raise _Malformed(f"{where}: expected an object, got {type(node).__name__}")
    if key not in node:
        raise _Malformed(f"{where}: missing {key!r}")
    value = node[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Malformed(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _parse_answer(answer: Any, where: str, context: str) -> tuple[str, int]:
    text = _field(answer, "text", str, where)
    start = _field(answer, "answer_start", int, where)
    if not text:
        raise _Malformed(f"{where}.text: empty answer")
    if context[start : start + len(text)] != text:
        raise _Malformed(f"{where}: answer {text!r} is not in the context at answer_start={start}")
    return text, start


def _parse_qa(qa: Any, where: str, title: str, context: str) -> SquadExample:
    qid = _field(qa, "id", str, where)
    question = _field(qa, "question", str, where)
    answers = _field(qa, "answers", list, where)
    if not question.strip():
        raise _Malformed(f"{where}.question: empty question")
    if not answers:
        raise _Malformed(
            f"{where}.answers: empty; SQuAD v1.1 needs at least one answer per question "
            "(v2.0 unanswerable questions are not supported)"
        )
    pairs = [_parse_answer(a, f"{where}.answers[{j}]", context) for j, a in enumerate(answers)]
    return SquadExample(qid, title, context, question, [t for t, _ in pairs], [s for _, s in pairs])


def _parse_article(article: Any, where: str) -> list[SquadExample]:
    title = article.get("title", "") if isinstance(article, dict) else ""
    examples = []
    for p, paragraph in enumerate(_field(article, "paragraphs", list, where)):
        here = f"{where}.paragraphs[{p}]"
        context = _field(paragraph, "context", str, here)
        if not context.strip():
            raise _Malformed(f"{here}.context: empty context")
        qas = _field(paragraph, "qas", list, here)
        examples += [_parse_qa(qa, f"{here}.qas[{q}]", str(title), context) for q, qa in enumerate(qas)]
    return examples


def _check_unique_ids(examples: list[SquadExample], where: str) -> None:
    """Predictions are keyed by question id, so a repeated id would silently drop a question."""
    seen: set[str] = set()
    for example in examples:
        if example.id in seen:
            raise DataError(f"{where}: question id {example.id!r} appears more than once")
        seen.add(example.id)


def parse_squad_json(path: str) -> list[list[SquadExample]]:
    """Parse a SQuAD v1.1 JSON file into per-article example lists, in file order."""
    text = read_text(path)
    try:
        root = json.loads(text)
    except json.JSONDecodeError as error:
        # An unterminated string means the scanner hit the end of the text, like an error at the very end.
        truncated = error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated string")
        what = "the JSON ends early (truncated file?)" if truncated else "malformed JSON"
        where = f"line {error.lineno}, column {error.colno}"
        raise DataError(f"{path}: {what}: {error.msg} ({where})") from None
    try:
        data = _field(root, "data", list, "top level")
        articles = [_parse_article(article, f"data[{i}]") for i, article in enumerate(data)]
    except _Malformed as error:
        raise DataError(f"{path}: {error}") from None
    examples = [example for article in articles for example in article]
    if not examples:
        raise DataError(f"{path}: no questions (data -> paragraphs -> qas is empty)")
    _check_unique_ids(examples, path)
    return articles


def examples_from_rows(rows: Any, where: str) -> list[SquadExample]:
    """Examples from a `datasets` split with SQuAD's columns (answers: {text: [...], answer_start: [...]})."""
    require_columns(rows.column_names, DATASET_COLUMNS, where)
    examples = []
    try:
        for i, row in enumerate(rows):
            answers = row["answers"] or {}
            texts, starts = answers.get("text", []), answers.get("answer_start", [])
            if len(texts) != len(starts):
                raise _Malformed(f"row {i}.answers: {len(texts)} texts but {len(starts)} answer_start values")
            qa = {
                "id": row["id"],
                "question": row["question"],
                "answers": [{"text": t, "answer_start": s} for t, s in zip(texts, starts, strict=True)],
            }
            examples.append(_parse_qa(qa, f"row {i}", row["title"] or "", row["context"]))
    except _Malformed as error:
        raise DataError(f"{where}: {error}") from None
    if not examples:
        raise DataError(f"{where}: no questions")
    _check_unique_ids(examples, where)
    return examples


@dataclass
class SquadMeta(Windows):
    """What scoring needs per window besides its origin and offsets: the examples, for ids and contexts."""

    examples: list[SquadExample]


def answer_token_spans(
    examples: list[SquadExample],
    sample: np.ndarray,
    offsets: np.ndarray,
    context: np.ndarray,
    cls: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Token start/end of each feature's first answer, or the CLS index when the window does not hold it."""
    starts, ends = cls.copy(), cls.copy()
    for f, i in enumerate(sample):
        example = examples[i]
        start_char = example.answer_starts[0]
        end_char = start_char + len(example.answers[0])
        tokens = np.flatnonzero(context[f])
        token_starts, token_ends = offsets[f, tokens, 0], offsets[f, tokens, 1]
        if token_starts[0] > start_char or token_ends[-1] < end_char:
            continue
        starts[f] = tokens[token_starts <= start_char][-1]
        ends[f] = tokens[token_ends >= end_char][0]
    return starts, ends


def decode_answers(
    meta: SquadMeta, start: np.ndarray, end: np.ndarray, settings: QaSettings
) -> dict[str, str]:
    """{question id: answer text} taking, per question, the best span over all its windows."""
    answers = {}
    for i, span in best_spans(meta, start, end, settings).items():
        example = meta.examples[i]
        answers[example.id] = "" if span is None else example.context[span.start : span.end]
    return answers


@TASKS.register("squad", SquadConfig)
class SquadTask(Task):
    name = "squad"
    head = "question_answering"
    output_names = ("start_logits", "end_logits")
    primary_metric = "f1"
    metric_names = ("exact_match", "f1")
    auto_class_name = "AutoModelForQuestionAnswering"
    architecture_suffix = "ForQuestionAnswering"
    config: SquadConfig

    def __init__(self, config: SquadConfig) -> None:
        super().__init__(config)
        self._parsed: dict[str, list[list[SquadExample]]] = {}

    # -- data ----------------------------------------------------------------------------------------
    def source_file(self, split: str) -> str | None:
        if self.config.holdout_every is not None:
            return self.config.train_file or self.config.eval_file
        return super().source_file(split)

    def read_file(self, path: str, split: str) -> list[SquadExample]:
        if path not in self._parsed:
            self._parsed[path] = parse_squad_json(path)
        articles = self._parsed[path]
        every, offset = self.config.holdout_every, self.config.holdout_offset
        if every is not None:
            articles = [a for i, a in enumerate(articles) if (i % every == offset) == (split == "eval")]
        examples = [example for article in articles for example in article]
        if not examples:
            raise DataError(
                f"{path}: holdout_every={every}, holdout_offset={offset} leaves no questions for {split} "
                f"(the file has {len(self._parsed[path])} articles)"
            )
        return examples

    def read_rows(self, rows: Any, where: str) -> list[SquadExample]:
        return examples_from_rows(rows, where)

    # -- features ------------------------------------------------------------------------------------
    def _windows(
        self, examples: list[SquadExample], tokenizer: Any, input_names: list[str]
    ) -> tuple[dict[str, Tensor], Windows]:
        questions = [example.question for example in examples]
        contexts = [example.context for example in examples]
        ids = [example.id for example in examples]
        try:
            return encode_windows(tokenizer, input_names, questions, contexts, self.config.qa_settings(), ids)
        except WindowError as error:
            raise DataError(
                f"{error} Raise task.max_seq_length or lower task.max_query_length or task.doc_stride."
            ) from None

    def featurize(
        self, examples: list[SquadExample], tokenizer: Any, input_names: list[str], train: bool
    ) -> Features:
        inputs, windows = self._windows(examples, tokenizer, input_names)
        sample, offsets, context = windows.example_index, windows.offsets, windows.context_mask
        if not train:
            return Features(inputs, {}, SquadMeta(sample, offsets, context, examples))
        cls_id = tokenizer.cls_token_id
        ids = inputs["input_ids"].numpy()
        cls = (ids == cls_id).argmax(axis=1) if cls_id is not None else np.zeros(len(sample), dtype=np.int64)
        starts, ends = answer_token_spans(examples, sample, offsets, context, cls.astype(np.int64))
        labels = {"start_positions": torch.from_numpy(starts), "end_positions": torch.from_numpy(ends)}
        return Features(inputs, labels)

    # -- metrics and loss ----------------------------------------------------------------------------
    def score(
        self, outputs: dict[str, np.ndarray], features: Features
    ) -> tuple[dict[str, float], dict[str, Any]]:
        meta = features.meta
        if not isinstance(meta, SquadMeta):
            raise ValueError("SQuAD scoring needs features from eval_features (they carry offsets)")
        logits = check_outputs(outputs, self.output_names, len(features))
        settings = self.config.qa_settings()
        predictions = decode_answers(meta, logits["start_logits"], logits["end_logits"], settings)
        scored = dict.fromkeys(meta.example_index.tolist())
        gold = {meta.examples[i].id: meta.examples[i].answers for i in scored}
        return squad_evaluate(gold, predictions), predictions

    def deploy_settings(self) -> dict[str, Any]:
        settings = dataclasses.asdict(self.config.qa_settings())
        del settings["max_seq_length"]  # the artifact records it for every task
        return settings

    def task_loss(self, logits: dict[str, Tensor], labels: dict[str, Tensor]) -> Tensor:
        start = position_cross_entropy(logits["start_logits"], labels["start_positions"])
        end = position_cross_entropy(logits["end_logits"], labels["end_positions"])
        return (start + end) / 2
