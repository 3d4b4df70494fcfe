"""Throughput/latency measurement on synthetic full-length inputs at a session's fixed shape."""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .inputs import synthetic_batch
from .session import Session


@dataclass(frozen=True)
class BenchmarkResult:
    throughput: float  # samples/s, median over rounds
    throughput_spread: tuple[float, float]  # (min, max) over rounds
    latency_p50_ms: float  # per call (one full batch), over all timed calls
    latency_p90_ms: float
    batch_size: int
    seq_len: int
    threads: int
    backend: str
    description: str

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["throughput_spread"] = list(self.throughput_spread)
        return out


def benchmark(
    session: Session,
    *,
    warmup: int = 3,
    rounds: int = 5,
    iterations: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> BenchmarkResult:
    """Time `rounds` x `iterations` calls after `warmup`; the median round resists noisy neighbours."""
    if rounds < 1 or iterations < 1 or warmup < 0:
        raise ValueError("rounds and iterations must be >= 1 and warmup >= 0")
    artifact = session.artifact
    inputs = synthetic_batch(
        artifact.input_names, session.batch_size, session.seq_len, artifact.vocab_size, seed
    )
    for _ in range(warmup):
        session.run(inputs)
    throughputs, latencies = [], []
    for index in range(rounds):
        times = time_calls(session, inputs, iterations)
        latencies.extend(times)
        throughputs.append(session.batch_size * iterations / sum(times))
        if progress:
            print(f"round {index + 1}/{rounds}: {throughputs[-1]:.1f} samples/s", file=sys.stderr, flush=True)
    p50, p90 = latency_percentiles_ms(latencies)
    return BenchmarkResult(
        throughput=statistics.median(throughputs),
        throughput_spread=(min(throughputs), max(throughputs)),
        latency_p50_ms=p50,
        latency_p90_ms=p90,
        batch_size=session.batch_size,
        seq_len=session.seq_len,
        threads=session.threads,
        backend=session.backend,
        description=session.description,
    )


def latency_percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    """(p50, p90) in milliseconds of per-call times given in seconds."""
    p50, p90 = np.percentile(np.asarray(seconds) * 1000.0, [50, 90])
    return float(p50), float(p90)


def time_calls(session: Session, inputs: dict, iterations: int) -> list[float]:
    """Seconds per call of `iterations` back-to-back calls."""
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        session.run(inputs)
        times.append(time.perf_counter() - start)
    return times
