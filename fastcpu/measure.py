"""The `runtime` config group: deploy the exported artifact on a runtime backend and measure it there.

Accuracy comes from the artifact running on its backend (not from the training-time module), so the
numbers describe what a user would deploy: int8 rounding, compaction and padding included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastcpu_runtime as rt
from fastcpu_runtime.backends import broken_backends

from .config import ConfigError, check_range, store_base
from .evaluation import evaluate
from .pruning import sparsity_report
from .tasks.base import Features, Task

MEASURED = ("throughput", "latency_p50_ms", "latency_p90_ms", "model_mb", "artifact_mb", "sparsity")


@dataclass
class RuntimeConfig:
    backend: str = "auto"  # runtime backend; auto: the faster of the candidates, raced at the trial's shape
    batch_size: int = 8  # evaluation and benchmark batch; the session is compiled (or traced) for this shape
    seq_len: int | None = None  # benchmark sequence length; null: the task's max_seq_length
    threads: int | None = None  # intra-op threads; null: PyTorch's default (all cores)
    warmup: int = 3  # untimed calls before the benchmark
    rounds: int = 5  # throughput is the median over rounds
    iterations: int = 10  # timed calls per round

    def validate(self, key: str) -> None:
        available = [rt.AUTO, *rt.available_backends()]
        if self.backend not in available:
            why = broken_backends().get(self.backend)
            why = f" ({why})" if why else ""
            raise ConfigError(
                f"{key}.backend={self.backend!r} is not available{why}; available: {', '.join(available)}"
            )
        for name in ("batch_size", "seq_len", "threads", "rounds", "iterations"):
            check_range(f"{key}.{name}", getattr(self, name), 1)
        check_range(f"{key}.warmup", self.warmup, 0)


store_base("runtime", RuntimeConfig())


def _directory_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def measure_artifact(
    artifact_dir: Path, task: Task, features: Features, config: RuntimeConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(result, predictions) of the artifact deployed on the configured backend."""
    artifact = rt.load_artifact(artifact_dir)
    eval_len = artifact.manifest["task"]["max_seq_length"]
    session = rt.create_session(
        artifact, config.backend, batch_size=config.batch_size, seq_len=eval_len, threads=config.threads
    )
    metrics, predictions = evaluate(
        session.run, task, features, config.batch_size, f"evaluation ({session.backend})"
    )
    if config.seq_len not in (None, eval_len):
        session = rt.create_session(
            artifact,
            config.backend,
            batch_size=config.batch_size,
            seq_len=config.seq_len,
            threads=config.threads,
        )
    speed = rt.benchmark(
        session, warmup=config.warmup, rounds=config.rounds, iterations=config.iterations, progress=True
    )
    sparsity = sparsity_report(artifact.build_model())
    result = {
        **metrics,
        **{k: v for k, v in speed.as_dict().items() if k != "description"},
        "backend_description": session.description,
        "scheme": artifact.scheme,
        "model_mb": (artifact_dir / "model.safetensors").stat().st_size / 2**20,
        "artifact_mb": _directory_mb(artifact_dir),
        "sparsity": sparsity["overall"],
        "sparsity_per_layer": sparsity["per_layer"],
    }
    return result, predictions
