"""SQuAD v1.1 extractive question answering: loading, run_qa-style windowing, n-best decoding, EM/F1.

Long contexts are split into overlapping windows (features); training labels point at the answer's
tokens in the window that holds it, and evaluation picks the best span over all of a question's windows.
"""

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
    select_inputs,
    tokenize,
)
from fastcpu.tasks.squad_metrics import squad_evaluate

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
class SquadMeta:
    """What n-best decoding needs per feature: its example and the character span of each token."""

    examples: list[SquadExample]
    example_index: np.ndarray  # [F] index into `examples`
    offsets: np.ndarray  # [F, S, 2] character offsets into the example's context
    context_mask: np.ndarray  # [F, S] True for context tokens (the only ones an answer may use)

    def offset_mapping(self, feature: int) -> list[tuple[int, int] | None]:
        """HF run_qa's view of one feature: context tokens' offsets, None for question/special/padding."""
        return [
            (int(a), int(b)) if keep else None
            for (a, b), keep in zip(self.offsets[feature], self.context_mask[feature], strict=True)
        ]

    def subset(self, n: int) -> "SquadMeta":
        return SquadMeta(self.examples, self.example_index[:n], self.offsets[:n], self.context_mask[:n])


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


def best_feature_spans(
    start: np.ndarray, end: np.ndarray, context: np.ndarray, n_best: int, max_answer_length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per feature, the best valid (score, start, end) among the top-n start and end tokens.

    Vectorised form of run_qa's loop: take the n_best highest start and end logits, keep pairs inside the
    context with start <= end and at most max_answer_length tokens, score = start + end logit. A feature
    with no valid pair scores -inf.
    """
    n_features = len(start)
    n = min(n_best, start.shape[1])
    rows = np.arange(n_features)[:, None]
    top_start = np.argsort(start, axis=1)[:, ::-1][:, :n]
    top_end = np.argsort(end, axis=1)[:, ::-1][:, :n]
    length = top_end[:, None, :] - top_start[:, :, None] + 1
    valid = (
        context[rows, top_start][:, :, None]
        & context[rows, top_end][:, None, :]
        & (length >= 1)
        & (length <= max_answer_length)
    )
    pair_scores = start[rows, top_start][:, :, None] + end[rows, top_end][:, None, :]
    scores = np.where(valid, pair_scores, -np.inf).reshape(n_features, -1)
    best = scores.argmax(axis=1)
    index = np.arange(n_features)
    return scores[index, best], top_start[index, best // n], top_end[index, best % n]


def decode_answers(
    meta: SquadMeta, start: np.ndarray, end: np.ndarray, n_best: int, max_answer_length: int
) -> dict[str, str]:
    """{question id: answer text} taking, per question, the best span over all its features."""
    spans = best_feature_spans(start, end, meta.context_mask, n_best, max_answer_length)
    scores, span_start, span_end = spans
    best: dict[int, int] = {}
    for f, i in enumerate(meta.example_index.tolist()):
        if i not in best or scores[f] > scores[best[i]]:
            best[i] = f
    answers = {}
    for i, f in best.items():
        example = meta.examples[i]
        if np.isneginf(scores[f]):
            answers[example.id] = ""
        else:
            first, last = meta.offsets[f, span_start[f], 0], meta.offsets[f, span_end[f], 1]
            answers[example.id] = example.context[first:last]
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
    def _questions(self, examples: list[SquadExample], tokenizer: Any) -> tuple[list[str], list[int]]:
        """Left-stripped questions cut to max_query_length tokens (so they cannot crowd out the context),
        with their token counts."""
        limit = self.config.max_query_length
        questions = [example.question.lstrip() for example in examples]
        spans = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        questions = [
            q if len(s) <= limit else q[: s[limit - 1][1]] for q, s in zip(questions, spans, strict=True)
        ]
        lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
        return questions, lengths

    def _check_room(self, examples: list[SquadExample], lengths: list[int], tokenizer: Any) -> None:
        """Fail clearly where the tokenizer would panic: every window must fit more than doc_stride
        context tokens next to the question."""
        c = self.config
        specials = tokenizer.num_special_tokens_to_add(pair=True)
        room = c.max_seq_length - specials - np.asarray(lengths)
        bad = np.flatnonzero(room <= c.doc_stride)
        if len(bad):
            i = int(bad[0])
            others = f" ({len(bad) - 1} more questions have the same problem)" if len(bad) > 1 else ""
            raise DataError(
                f"question {examples[i].id!r} has {lengths[i]} tokens (after cutting to "
                f"max_query_length={c.max_query_length}); with {specials} special tokens a "
                f"max_seq_length={c.max_seq_length} window leaves {int(room[i])} context tokens, which must "
                f"exceed doc_stride={c.doc_stride}{others}. Raise task.max_seq_length or lower "
                "task.max_query_length or task.doc_stride."
            )

    def _encode(self, examples: list[SquadExample], tokenizer: Any, input_names: list[str]) -> Any:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("SQuAD preprocessing needs a fast tokenizer (it uses offset mappings)")
        questions, lengths = self._questions(examples, tokenizer)
        self._check_room(examples, lengths, tokenizer)
        return tokenize(
            tokenizer,
            input_names,
            self.config.max_seq_length,
            questions,
            [example.context for example in examples],
            truncation="only_second",
            stride=self.config.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )

    def featurize(
        self, examples: list[SquadExample], tokenizer: Any, input_names: list[str], train: bool
    ) -> Features:
        encoding = self._encode(examples, tokenizer, input_names)
        inputs = select_inputs(encoding, input_names)
        sample = np.asarray(encoding["overflow_to_sample_mapping"], dtype=np.int64)
        offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64)
        context = np.array([[s == 1 for s in encoding.sequence_ids(f)] for f in range(len(sample))])
        if not train:
            return Features(inputs, {}, SquadMeta(examples, sample, offsets, context))
        cls_id = tokenizer.cls_token_id
        ids = np.asarray(encoding["input_ids"])
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
        c = self.config
        predictions = decode_answers(
            meta, logits["start_logits"], logits["end_logits"], c.n_best_size, c.max_answer_length
        )
        scored = dict.fromkeys(meta.example_index.tolist())
        gold = {meta.examples[i].id: meta.examples[i].answers for i in scored}
        return squad_evaluate(gold, predictions), predictions

    def task_loss(self, logits: dict[str, Tensor], labels: dict[str, Tensor]) -> Tensor:
        start = position_cross_entropy(logits["start_logits"], labels["start_positions"])
        end = position_cross_entropy(logits["end_logits"], labels["end_positions"])
        return (start + end) / 2
