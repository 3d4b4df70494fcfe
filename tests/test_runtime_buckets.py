"""Sequence-length buckets: a call runs at the shortest compiled length holding its tokens and answers as
the session padded to the artifact's length does; the real-traffic benchmark on real SQuAD text."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
from runtime_helpers import (
    CALIBRATION_TEXTS,
    CONTEXTS,
    QA_TASK,
    QUESTIONS,
    encode,
    encode_pairs,
    encoder_linears,
    save,
    tiny_runtime_model,
)
from transformers import BertForQuestionAnswering

import fastcpu_runtime as rt
from fastcpu_runtime.buckets import attended_length, bucket_lengths, create_bucketed_session

QA_SETTINGS = {"doc_stride": 16, "max_query_length": 16, "n_best_size": 20, "max_answer_length": 30}
LONG_CONTEXT = " ".join(CONTEXTS * 4)  # several 64-token windows: the full-length bucket too
SQUAD_SAMPLE = files("fastcpu") / "data" / "squad_sample.json"


@pytest.fixture(scope="module")
def qa_artifact(tmp_path_factory, tokenizer) -> Path:
    model = tiny_runtime_model(BertForQuestionAnswering, initializer_range=0.2)
    return save(tmp_path_factory.mktemp("qa") / "artifact", model, tokenizer, task=QA_TASK | QA_SETTINGS)


def test_attended_length_is_one_past_the_last_attended_position() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    assert attended_length({"input_ids": torch.zeros_like(mask), "attention_mask": mask}) == 5
    assert attended_length({"input_ids": torch.zeros(2, 7, dtype=torch.long)}) == 7
    left_padded = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])  # nothing after the last attended token
    assert attended_length({"input_ids": torch.zeros_like(left_padded), "attention_mask": left_padded}) == 4


def test_bucket_lengths_end_at_the_artifact_length_and_refuse_others() -> None:
    assert bucket_lengths([32, 16, 32], 64) == [16, 32, 64]
    assert bucket_lengths([], 64) == [64]
    with pytest.raises(
        ValueError, match=r"buckets \[0, 65\] are outside 1..64 \(the artifact's max_seq_length\)"
    ):
        bucket_lengths([0, 16, 65], 64)


def test_a_short_batch_runs_on_the_short_bucket_with_the_padded_outputs(qa_artifact, tokenizer) -> None:
    inputs = encode_pairs(tokenizer)  # padded to their own longest row, under 32 tokens
    length = attended_length(inputs)
    assert length <= 32
    bucketed = create_bucketed_session(qa_artifact, "eager", batch_size=4, buckets=[16, 32])
    padded = rt.create_session(qa_artifact, "eager", batch_size=4, seq_len=64)
    assert bucketed.buckets == [16, 32, 64]
    assert bucketed.session_for(length).seq_len == 32
    assert bucketed.session_for(33).seq_len == 64
    got, expected = bucketed.run(inputs), padded.run(inputs)
    for name in ("start_logits", "end_logits"):
        assert got[name].shape == expected[name].shape
        real = inputs["attention_mask"].bool()
        torch.testing.assert_close(got[name][real], expected[name][real], atol=1e-5, rtol=1e-5)
        # positions the short bucket never ran hold -inf, so no answer can start or end there
        assert torch.isneginf(got[name][:, length:]).all()


def test_bucketed_pipelines_give_the_padded_answers_on_int8(tmp_path, tokenizer) -> None:
    """Static int8 on native with recorded activation ranges (as QAT records them): every bucket quantizes
    the same way, so padding cannot change an answer."""
    model = tiny_runtime_model(BertForQuestionAnswering, initializer_range=0.2)
    modules = encoder_linears(model)
    ranges = input_ranges(model, modules, encode(tokenizer, CALIBRATION_TEXTS, padding=True))
    int8 = save(
        tmp_path / "int8", model, tokenizer, task=QA_TASK | QA_SETTINGS, scheme="static_int8",
        modules=modules, ranges=ranges,
    )  # fmt: skip
    questions, contexts = [*QUESTIONS, QUESTIONS[0]], [*CONTEXTS, LONG_CONTEXT]
    padded = rt.load_pipeline(int8, "native", batch_size=1)
    bucketed = rt.load_pipeline(int8, "native", batch_size=1, buckets=[32])
    assert bucketed.session.buckets == [32, 64]
    expected, got = padded(questions, contexts), bucketed(questions, contexts)
    assert [a.answer for a in got] == [a.answer for a in expected]
    assert np.allclose([a.score for a in got], [a.score for a in expected], atol=1e-3)


def input_ranges(model: torch.nn.Module, modules: list[str], inputs: dict) -> dict[str, list[float]]:
    """The [min, max] each Linear's input takes on `inputs`."""
    seen: dict[str, list[float]] = {}

    def record(name: str):
        def hook(_module, args) -> None:
            x = args[0]
            low, high = seen.get(name, [float("inf"), float("-inf")])
            seen[name] = [min(low, x.min().item()), max(high, x.max().item())]

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in modules]
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    return seen


def traffic(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fastcpu_runtime.traffic", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_traffic_times_padded_against_bucketed_on_real_squad_text(qa_artifact, tmp_path) -> None:
    out = tmp_path / "traffic.json"
    done = traffic(
        "--artifact", str(qa_artifact), "--requests", str(SQUAD_SAMPLE), "--questions", "8",
        "--rounds", "2", "--backends", "eager", "--buckets", "32", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    lengths, (record,) = report["traffic"], report["records"]
    assert lengths["padded_length"] == 64 and 16 < lengths["tokens_p50"] <= lengths["tokens_max"] <= 64
    assert lengths["windows_per_request"] > 1  # SQuAD contexts are longer than one 64-token window
    assert record["backend"] == "eager" and record["buckets"] == [32, 64]
    assert record["same_answers"] == record["requests"] == 8
    for mode in ("padded", "bucketed"):
        assert record[mode]["requests_per_s"] > 0
        assert record[mode]["latency_p50_ms"] <= record[mode]["latency_p90_ms"]
    assert "| eager | buckets [32, 64] |" in done.stdout


PAIR = json.dumps({"question": "Who wrote Hamlet?", "context": CONTEXTS[1]})


@pytest.mark.parametrize(
    ("name", "content", "args", "message"),
    [
        ("requests.json", json.dumps([json.loads(PAIR)]), [], "a .json file must be SQuAD's"),
        ("requests.jsonl", PAIR, ["--rounds=1", "--buckets", "32", "65"], "buckets [65] are outside 1..64"),
        ("requests.jsonl", f"{PAIR}\n{PAIR}", ["--rounds", "3"], "2 requests, fewer than --rounds"),
        ("requests.jsonl", f"{PAIR}\nnot json", [], "requests.jsonl line 2 is not JSON"),
    ],
)
def test_traffic_refuses_bad_input_before_compiling(tmp_path, name, content, args, message) -> None:
    """One line and exit 2, before any backend has run."""
    path = tmp_path / name
    path.write_text(content)
    done = traffic("--shape", "tiny", "--seq", "64", "--requests", str(path), "--backends", "eager", *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert "eager: done" not in done.stderr
