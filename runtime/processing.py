"""Text in, model inputs out; model outputs in, answers out: the processing around a deployed model.

One implementation serves both sides: fastcpu's tasks tokenize and decode with it while a trial scores
its student, and the deploy-side `Pipeline` answers requests with it, so a served model answers exactly
as its trial was scored. Extractive QA follows Hugging Face's run_qa: long contexts are split into
overlapping windows, and each question's answer is the best span over all of its windows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ArtifactError


def tokenize(tokenizer: Any, input_names: Sequence[str], max_length: int, *texts: Any, **options: Any) -> Any:
    """Call the tokenizer padded to `max_length`, asking only for the inputs needed.

    Outputs stay Python lists: transformers' own numpy conversion is several times slower than ours.
    """
    return tokenizer(
        *texts,
        max_length=max_length,
        padding="max_length",
        return_token_type_ids="token_type_ids" in input_names,
        return_attention_mask="attention_mask" in input_names,
        **options,
    )


def select_inputs(encoding: Any, input_names: Sequence[str]) -> dict[str, Tensor]:
    """Exactly the model's input names as int64 tensors; fail clearly if the tokenizer lacks one."""
    missing = [name for name in input_names if name not in encoding]
    if missing:
        raise ValueError(
            f"the tokenizer does not produce model input(s) {missing}; it gives {list(encoding)}"
        )
    return {name: torch.from_numpy(np.asarray(encoding[name], dtype=np.int64)) for name in input_names}


def encode_texts(
    tokenizer: Any, input_names: Sequence[str], texts: Sequence[str], max_length: int
) -> dict[str, Tensor]:
    """Model inputs for single texts (classification), cut to `max_length` tokens."""
    return select_inputs(
        tokenize(tokenizer, input_names, max_length, list(texts), truncation=True), input_names
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, stable for large logits."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


# -- extractive question answering -------------------------------------------------------------------
@dataclass(frozen=True)
class QaSettings:
    """How questions and contexts become windows and how spans are chosen; recorded in the artifact
    (fastcpu's SquadConfig holds the defaults)."""

    max_seq_length: int
    doc_stride: int  # tokens shared by consecutive windows of one context
    max_query_length: int  # questions are cut to this many tokens
    n_best_size: int  # start and end candidates per window
    max_answer_length: int  # tokens

    @classmethod
    def from_manifest(cls, task: Mapping[str, Any]) -> QaSettings:
        """The settings an artifact's `task` records; an artifact written before they were is refused."""
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if name not in task]
        if missing:
            raise ArtifactError(
                f"the artifact's task records no {missing}, which answering questions needs; re-export the "
                "model with fastcpu to get a complete artifact"
            )
        return cls(**{name: int(task[name]) for name in names})


class WindowError(ValueError):
    """A question leaves a window too little room for its context at these settings."""


@dataclass
class Windows:
    """Where each window (a row of model inputs) comes from: its question and its tokens' characters."""

    example_index: np.ndarray  # [F] the question (position in the input lists) each window belongs to
    offsets: np.ndarray  # [F, S, 2] character offsets of each token into its context
    context_mask: np.ndarray  # [F, S] True for context tokens, the only ones an answer may use

    def offset_mapping(self, window: int) -> list[tuple[int, int] | None]:
        """HF run_qa's view of one window: context tokens' offsets, None for question/special/padding."""
        return [
            (int(a), int(b)) if keep else None
            for (a, b), keep in zip(self.offsets[window], self.context_mask[window], strict=True)
        ]

    def subset(self, n: int) -> Windows:
        """The first n windows (subclasses keep their extra fields)."""
        return dataclasses.replace(
            self,
            example_index=self.example_index[:n],
            offsets=self.offsets[:n],
            context_mask=self.context_mask[:n],
        )


def _cut_questions(tokenizer: Any, questions: Sequence[str], limit: int) -> tuple[list[str], list[int]]:
    """Left-stripped questions cut to `limit` tokens (so they cannot crowd out the context), with their
    token counts."""
    stripped = [question.lstrip() for question in questions]
    spans = tokenizer(stripped, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cut = [q if len(s) <= limit else q[: s[limit - 1][1]] for q, s in zip(stripped, spans, strict=True)]
    lengths = [len(ids) for ids in tokenizer(cut, add_special_tokens=False)["input_ids"]]
    return cut, lengths


def _check_room(tokenizer: Any, lengths: list[int], settings: QaSettings, names: Sequence[str]) -> None:
    """Fail clearly where the tokenizer would panic: every window must fit more than doc_stride context
    tokens next to the question."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    room = settings.max_seq_length - specials - np.asarray(lengths)
    bad = np.flatnonzero(room <= settings.doc_stride)
    if len(bad):
        i = int(bad[0])
        others = f" ({len(bad) - 1} more questions have the same problem)" if len(bad) > 1 else ""
        raise WindowError(
            f"question {names[i]!r} has {lengths[i]} tokens (after cutting to "
            f"max_query_length={settings.max_query_length}); with {specials} special tokens a "
            f"max_seq_length={settings.max_seq_length} window leaves {int(room[i])} context tokens, which "
            f"must exceed doc_stride={settings.doc_stride}{others}."
        )


def encode_windows(
    tokenizer: Any,
    input_names: Sequence[str],
    questions: Sequence[str],
    contexts: Sequence[str],
    settings: QaSettings,
    names: Sequence[str] | None = None,
) -> tuple[dict[str, Tensor], Windows]:
    """Model inputs for every window of every (question, context) pair, and where the windows come
    from. `names` (e.g. question ids) identify a question in errors; default: its position."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("question answering needs a fast tokenizer (it uses offset mappings)")
    if len(questions) != len(contexts):
        raise ValueError(f"got {len(questions)} questions but {len(contexts)} contexts")
    cut, lengths = _cut_questions(tokenizer, questions, settings.max_query_length)
    _check_room(tokenizer, lengths, settings, names or [str(i) for i in range(len(cut))])
    encoding = tokenize(
        tokenizer,
        input_names,
        settings.max_seq_length,
        cut,
        list(contexts),
        truncation="only_second",
        stride=settings.doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    sample = np.asarray(encoding["overflow_to_sample_mapping"], dtype=np.int64)
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64)
    context = np.array([[s == 1 for s in encoding.sequence_ids(f)] for f in range(len(sample))])
    return select_inputs(encoding, input_names), Windows(sample, offsets, context)


def best_window_spans(
    start: np.ndarray, end: np.ndarray, context: np.ndarray, n_best: int, max_answer_length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per window, the best valid (score, start token, end token) among the top-n start and end tokens.

    Vectorised form of run_qa's loop: take the n_best highest start and end logits among the context
    tokens (run_qa ranks all tokens, so question and padding tokens can crowd out candidates, and the
    answer would depend on the padded length), keep pairs with start <= end and at most
    max_answer_length tokens, score = start + end logit. A window with no valid pair scores -inf.
    """
    start, end = np.where(context, start, -np.inf), np.where(context, end, -np.inf)
    n_windows = len(start)
    n = min(n_best, start.shape[1])
    rows = np.arange(n_windows)[:, None]
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
    scores = np.where(valid, pair_scores, -np.inf).reshape(n_windows, -1)
    best = scores.argmax(axis=1)
    index = np.arange(n_windows)
    return scores[index, best], top_start[index, best // n], top_end[index, best % n]


@dataclass(frozen=True)
class Span:
    """A question's answer: characters [start, end) of its context, found in one window."""

    window: int
    start_token: int
    end_token: int
    start: int
    end: int
    score: float  # start + end logit, the quantity run_qa ranks spans by

    def probability(self, start_logits: np.ndarray, end_logits: np.ndarray, context: np.ndarray) -> float:
        """P(start) * P(end) within the span's window, each a softmax over the window's context tokens."""
        tokens = np.flatnonzero(context[self.window])
        p_start = softmax(start_logits[self.window, tokens])[tokens == self.start_token]
        p_end = softmax(end_logits[self.window, tokens])[tokens == self.end_token]
        return float(p_start[0] * p_end[0])


def best_spans(
    windows: Windows, start: np.ndarray, end: np.ndarray, settings: QaSettings
) -> dict[int, Span | None]:
    """Per question (its index), the best span over all of its windows; None when no window has one."""
    scores, span_start, span_end = best_window_spans(
        start, end, windows.context_mask, settings.n_best_size, settings.max_answer_length
    )
    best: dict[int, int] = {}
    for window, question in enumerate(windows.example_index.tolist()):
        if question not in best or scores[window] > scores[best[question]]:
            best[question] = window
    spans: dict[int, Span | None] = {}
    for question, w in best.items():
        if np.isneginf(scores[w]):
            spans[question] = None
            continue
        first, last = int(span_start[w]), int(span_end[w])
        start_char, end_char = int(windows.offsets[w, first, 0]), int(windows.offsets[w, last, 1])
        spans[question] = Span(w, first, last, start_char, end_char, float(scores[w]))
    return spans
