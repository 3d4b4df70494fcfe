"""SQuAD v1.1 exact match and F1, with the definitions of the official v1.1 evaluation script.

Published SQuAD numbers use exactly this normalization and token-overlap F1, so ours must too for the
scores to be comparable.
"""

import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (in that order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Harmonic mean of token precision and recall, counting repeated tokens at most as often as shared."""
    predicted = normalize_answer(prediction).split()
    gold = normalize_answer(ground_truth).split()
    overlap = sum((Counter(predicted) & Counter(gold)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted)
    recall = overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def _best(metric: Callable[[str, str], float], prediction: str, ground_truths: Sequence[str]) -> float:
    return max(metric(prediction, truth) for truth in ground_truths)


def squad_evaluate(gold: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict[str, float]:
    """Mean over gold questions of the best EM and F1 over their ground truths (x100); missing scores 0."""
    if not gold:
        raise ValueError("no gold questions to evaluate")
    exact = f1 = 0.0
    for qid, truths in gold.items():
        if not truths:
            raise ValueError(f"question {qid!r} has no ground-truth answers")
        if qid not in predictions:
            continue
        exact += _best(exact_match_score, predictions[qid], truths)
        f1 += _best(f1_score, predictions[qid], truths)
    return {"exact_match": 100.0 * exact / len(gold), "f1": 100.0 * f1 / len(gold)}
