"""What each step of the fused sparse encoder buys: the sparse backend capped at every step, against native.

    python benchmarks/sparse_steps.py --shape minilm-l6 --sparsity 0 0.8 --batch 1 8 --seq 128

For every sparsity and batch size, one `native` static int8 session (the dense baseline) and one `sparse`
session per step of FASTCPU_SPARSE_FUSION (`none` = the Linears alone on the kernel, then each step on
top of the previous ones) are built on the same synthetic artifact, then timed in --rounds rounds of
--iterations calls each; every round runs all sessions, in an order that rotates, so the ratios (each
step against the one before it, and against native) are per-round ratios of paired runs, reported as
the median with its min-max. Sparsity 0 runs the same path on dense int8 weights, which separates
what the graph work buys from what sparsity buys.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from fastcpu_runtime import create_session
from fastcpu_runtime.backends.sparse import FUSION_ENV, FUSION_STEPS
from fastcpu_runtime.bench import time_calls
from fastcpu_runtime.compare import (
    artifact_parser,
    artifacts_for,
    format_system,
    known_noise_silenced,
    system_info,
)
from fastcpu_runtime.inputs import synthetic_batch


@contextlib.contextmanager
def fusion_capped(step: str) -> Iterator[None]:
    """FASTCPU_SPARSE_FUSION=step while a session is built (the backend reads it then)."""
    before = os.environ.get(FUSION_ENV)
    os.environ[FUSION_ENV] = step
    try:
        yield
    finally:
        if before is None:
            del os.environ[FUSION_ENV]
        else:
            os.environ[FUSION_ENV] = before


def build_sessions(artifact, batch: int, seq: int) -> dict[str, object]:
    """native, then sparse at every fusion step, all at [batch, seq]."""
    sessions = {"native": create_session(artifact, "native", batch_size=batch, seq_len=seq)}
    for step in FUSION_STEPS:
        with fusion_capped(step):
            sessions[f"sparse {step}"] = create_session(artifact, "sparse", batch_size=batch, seq_len=seq)
    return sessions


def timed_rounds(sessions: dict, inputs: dict, rounds: int, iterations: int) -> dict[str, list[float]]:
    """samples/s of every session in every round; the order of the sessions rotates between rounds."""
    names = list(sessions)
    throughput: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        order = names[index % len(names) :] + names[: index % len(names)]
        for name in order:
            session = sessions[name]
            session.run(inputs)  # one untimed call: the caches are this session's again
            times = time_calls(session, inputs, iterations)
            throughput[name].append(session.batch_size * iterations / sum(times))
    return throughput


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratios(top: list[float], bottom: list[float]) -> dict[str, float]:
    return summary([a / b for a, b in zip(top, bottom, strict=True)])


def records_for(sparsity: float, batch: int, throughput: dict[str, list[float]]) -> list[dict]:
    rows, previous = [], None
    for name, values in throughput.items():
        row = {"sparsity": sparsity, "batch": batch, "session": name, "samples_per_s": summary(values)}
        if name != "native":
            row["vs_previous"] = ratios(values, throughput[previous]) if previous != "native" else None
            row["vs_native"] = ratios(values, throughput["native"])
        rows.append(row)
        previous = name
    return rows


def _cell(stats: dict[str, float] | None, digits: int, suffix: str = "") -> str:
    if stats is None:
        return ""
    return f"{stats['median']:.{digits}f}{suffix} ({stats['min']:.{digits}f}–{stats['max']:.{digits}f})"


def format_table(records: list[dict]) -> str:
    lines = [
        "| sparsity | batch | session | samples/s median (min–max) | vs previous step | vs native |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['sparsity']:.0%} | {r['batch']} | {r['session']} | {_cell(r['samples_per_s'], 1)}"
            f" | {_cell(r.get('vs_previous'), 2, 'x')} | {_cell(r.get('vs_native'), 2, 'x')} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = artifact_parser("python benchmarks/sparse_steps.py", __doc__, "+")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--json", type=Path, help="write the records (a JSON list) here")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.iterations < 1 or args.threads < 1 or min(args.batch) < 1:
        parser.error("--rounds, --iterations, --threads and --batch must be >= 1")
    if args.scheme != "static_int8":
        parser.error(f"--scheme {args.scheme}: the steps are measured on static_int8 (native's baseline)")
    torch.set_num_threads(args.threads)
    records = []
    with known_noise_silenced(), artifacts_for(args) as artifacts:
        print(format_system(system_info()), file=sys.stderr)
        for artifact in artifacts:
            sparsity = float(artifact.manifest.get("sparsity", {}).get("target") or 0.0)
            for batch in args.batch:
                sessions = build_sessions(artifact, batch, args.seq)
                inputs = synthetic_batch(artifact.input_names, batch, args.seq, artifact.vocab_size)
                throughput = timed_rounds(sessions, inputs, args.rounds, args.iterations)
                records.extend(records_for(sparsity, batch, throughput))
    print(format_table(records))
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    return records


if __name__ == "__main__":
    main()
