"""Real-length traffic: requests/s and latency per request end to end, padded against bucketed.

    python -m fastcpu_runtime.traffic --artifact DIR --requests dev-v1.1.json --questions 300 \\
        --backends native sparse --buckets 64 128 192 256
    python -m fastcpu_runtime.traffic --shape minilm-l6 --sparsity 0.8 --seq 384 --requests dev-v1.1.json

Each request (a question with its context, or a text) is answered as a server answers it: tokenized
into windows, run, decoded (`Pipeline`), one request at a time, so the latency is a user's. Every
backend runs two pipelines on the same requests: padded (every window at the artifact's max_seq_length)
and bucketed (each call at the shortest bucket holding its tokens). Requests are split into --rounds
groups; each round times both pipelines on its group, in alternating order, so the gain is a per-round
ratio on the same requests, reported as the median with its min-max. The two pipelines' answers are
compared too: padding must not change them.

--requests takes a SQuAD JSON file (evenly spaced questions over its articles) or JSON lines with the
pipeline's fields ({"question": ..., "context": ...} or {"text": ...}).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import Artifact
from .auto import AUTO
from .backends import available_backends, get_backend
from .bench import latency_percentiles_ms
from .buckets import BucketedSession, bucket_lengths
from .compare import (
    artifact_parser,
    artifacts_for,
    format_system,
    known_noise_silenced,
    runnable,
    system_info,
)
from .errors import ArtifactError, BackendError, first_line
from .pipeline import Pipeline, load_pipeline, pipeline_class
from .predict import json_lines
from .processing import QaSettings, encode_texts, encode_windows
from .session import create_session

_WARMUP_REQUESTS = 3  # untimed requests per pipeline before each round
MODES = ("padded", "bucketed")


def read_requests(path: Path, count: int) -> list[dict[str, str]]:
    """`count` requests from a SQuAD JSON file (evenly spaced over it) or JSON lines (the first ones)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise ValueError(f"--requests {path}: a .json file must be SQuAD's ({{'data': [articles]}})")
        requests = [
            {"question": qa["question"], "context": paragraph["context"]}
            for article in data["data"]
            for paragraph in article["paragraphs"]
            for qa in paragraph["qas"]
        ]
        step = max(1, len(requests) // count)
        return requests[::step][:count]
    return json_lines(text.splitlines(), f"--requests {path}")[:count]


def window_lengths(artifact: Artifact, tokenizer: Any, requests: list[dict[str, str]]) -> dict[str, float]:
    """How long the traffic really is: windows per request and attended tokens per window."""
    names = artifact.input_names
    if artifact.head == "question_answering":
        questions, contexts = [r["question"] for r in requests], [r["context"] for r in requests]
        inputs, windows = encode_windows(
            tokenizer, names, questions, contexts, QaSettings.from_manifest(artifact.task)
        )
        per_request = len(windows.example_index) / len(requests)
    else:
        inputs = encode_texts(tokenizer, names, [r["text"] for r in requests], artifact.max_seq_length)
        per_request = 1.0
    lengths = inputs["attention_mask"].sum(dim=1).numpy()
    p50, p90 = np.percentile(lengths, [50, 90])
    return {
        "windows_per_request": per_request,
        "tokens_p50": float(p50),
        "tokens_p90": float(p90),
        "tokens_max": int(lengths.max()),
        "padded_length": artifact.max_seq_length,
    }


def time_requests(pipeline: Pipeline, requests: list[dict[str, str]]) -> tuple[list[float], list[dict]]:
    """Seconds per request, one request per call, and the answers."""
    times, answers = [], []
    for request in requests:
        start = time.perf_counter()
        answers.extend(pipeline.predict([request]))
        times.append(time.perf_counter() - start)
    return times, answers


def measure_backend(
    artifact: Artifact, backend: str, requests: list[dict[str, str]], args: argparse.Namespace
) -> dict[str, Any]:
    """Padded and bucketed pipelines of one backend over paired, alternating rounds of the requests; the
    bucketed one reuses the padded session as its longest bucket (one compile fewer)."""
    padded = load_pipeline(artifact, backend, batch_size=args.batch, threads=args.threads)
    shorter = [
        create_session(artifact, backend, batch_size=args.batch, seq_len=length, threads=args.threads)
        for length in bucket_lengths(args.buckets, artifact.max_seq_length)[:-1]
    ]
    bucketed = type(padded)(BucketedSession([*shorter, padded.session]), padded.tokenizer)
    pipelines = {"padded": padded, "bucketed": bucketed}
    groups = [list(group) for group in np.array_split(np.asarray(requests, dtype=object), args.rounds)]
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    answers: dict[str, list[dict]] = {mode: [] for mode in MODES}
    throughput: dict[str, list[float]] = {mode: [] for mode in MODES}
    for index, group in enumerate(groups):
        for mode in MODES if index % 2 == 0 else MODES[::-1]:
            time_requests(pipelines[mode], requests[:_WARMUP_REQUESTS])
            seconds, got = time_requests(pipelines[mode], group)
            times[mode].extend(seconds)
            answers[mode].extend(got)
            throughput[mode].append(len(group) / sum(seconds))
    gains = [b / p for b, p in zip(throughput["bucketed"], throughput["padded"], strict=True)]
    record: dict[str, Any] = {
        "backend": backend,
        "buckets": pipelines["bucketed"].session.buckets,
        "description": pipelines["bucketed"].session.description,
        "gain": statistics.median(gains),
        "gain_spread": [min(gains), max(gains)],
        "same_answers": sum(_same(a, b) for a, b in zip(answers["padded"], answers["bucketed"], strict=True)),
        "requests": len(requests),
    }
    for mode in MODES:
        p50, p90 = latency_percentiles_ms(times[mode])
        record[mode] = {
            "requests_per_s": statistics.median(throughput[mode]),
            "spread": [min(throughput[mode]), max(throughput[mode])],
            "latency_p50_ms": p50,
            "latency_p90_ms": p90,
        }
    return record


def _same(a: dict, b: dict) -> bool:
    """The same prediction: equal text fields and positions (scores may differ in the last digits)."""
    return all(a[k] == b[k] for k in a if not isinstance(a[k], float))


def format_report(records: list[dict], lengths: dict[str, float]) -> str:
    lines = [
        f"traffic: {records[0]['requests'] if records else 0} requests, "
        f"{lengths['windows_per_request']:.2f} windows each; attended tokens per window p50 "
        f"{lengths['tokens_p50']:.0f}, p90 {lengths['tokens_p90']:.0f}, max {lengths['tokens_max']} "
        f"(padded: {lengths['padded_length']})",
        "| backend | mode | requests/s (min–max) | p50 ms | p90 ms | gain (min–max) | same answers |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['backend']} | error: {r['error']} | | | | | |")
            continue
        for mode in MODES:
            m = r[mode]
            gain = f"{r['gain']:.2f}x ({r['gain_spread'][0]:.2f}–{r['gain_spread'][1]:.2f})"
            label = f"buckets {r['buckets']}" if mode == "bucketed" else f"padded to {r['buckets'][-1]}"
            lines.append(
                f"| {r['backend']} | {label} | {m['requests_per_s']:.1f} ({m['spread'][0]:.1f}–"
                f"{m['spread'][1]:.1f}) | {m['latency_p50_ms']:.1f} | {m['latency_p90_ms']:.1f} | "
                f"{gain if mode == 'bucketed' else ''} | "
                f"{str(r['same_answers']) + '/' + str(r['requests']) if mode == 'bucketed' else ''} |"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = artifact_parser("python -m fastcpu_runtime.traffic", __doc__, 1)
    parser.add_argument("--seq", type=int, default=384, help="synthetic only: the padded length")
    parser.add_argument("--requests", type=Path, required=True, help="SQuAD JSON or JSON lines")
    parser.add_argument("--questions", type=int, default=200, help="requests to time")
    parser.add_argument("--backends", nargs="+", help=f"default: every available backend; or {AUTO}")
    parser.add_argument("--buckets", type=int, nargs="+", default=[64, 128, 192, 256])
    parser.add_argument("--batch", type=int, default=1, help="windows (or texts) per model call")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the records (a JSON list) here")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.requests.is_file():
        parser.error(f"--requests {args.requests}: no such file")
    if args.questions < args.rounds or args.rounds < 1 or args.batch < 1:
        parser.error("--rounds and --batch must be >= 1, and --questions at least --rounds")
    if not 0.0 <= args.sparsity[0] < 1.0:
        parser.error("--sparsity must be in [0, 1)")
    args.backends = args.backends or available_backends()
    for backend in args.backends:
        if backend != AUTO:
            get_backend(backend)  # BackendError listing the available ones


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    with known_noise_silenced():
        try:
            _check_args(parser, args)
            requests = read_requests(args.requests, args.questions)
            if len(requests) < args.rounds:
                raise ValueError(f"--requests {args.requests}: {len(requests)} requests, fewer than --rounds")
            print(format_system(system_info()))
            with artifacts_for(args) as (artifact,):
                records, lengths = _measure(artifact, requests, args)
        except (ArtifactError, BackendError, ValueError) as err:
            parser.exit(2, f"{parser.prog}: error: {first_line(err)}\n")
    print(format_report(records, lengths))
    if args.json is not None:
        args.json.write_text(json.dumps({"traffic": lengths, "records": records}, indent=2))
    failed = sorted(r["backend"] for r in records if "error" in r)
    if failed:
        parser.exit(1, f"{parser.prog}: error: {len(failed)} backend(s) crashed: {', '.join(failed)}\n")
    return records


def _measure(
    artifact: Artifact, requests: list[dict[str, str]], args: argparse.Namespace
) -> tuple[list[dict], dict[str, float]]:
    """The traffic's lengths, then one record per backend (an error record for one that crashed); the
    requests and buckets are checked against the artifact before anything compiles."""
    pipeline_class(artifact).check_requests(requests)
    bucket_lengths(args.buckets, artifact.max_seq_length)
    lengths = window_lengths(artifact, artifact.tokenizer(), requests)
    records = []
    for backend in runnable(args.backends, artifact):
        try:
            records.append(measure_backend(artifact, backend, requests, args))
        except BackendError as err:
            print(f"{backend}: skip: {first_line(err)}", file=sys.stderr)
        except Exception as err:  # noqa: BLE001 - one backend's crash is its row, the others still run
            records.append({"backend": backend, "error": first_line(err), "requests": len(requests)})
        print(f"{backend}: done", file=sys.stderr, flush=True)
    return records, lengths


if __name__ == "__main__":
    main()
