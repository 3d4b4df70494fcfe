"""The `auto` backend name: deploy an artifact on whichever candidate backend runs it fastest here.

Candidates: an int8 artifact whose quantized Linears are block-sparse enough to have a chance (the fraction
of all-zero 4x1 blocks, 4 consecutive output rows x 1 input column, the sparse kernel's unit) races
`sparse` against `native`; anything else has one candidate, `native` (PT2E int8, bf16 or fp32 compiled by
inductor), or `eager` where that is unavailable. A race builds every candidate at the session's shape and
times them in paired, interleaved rounds; the faster median wins. Which one wins depends on the CPU (AMX
int8 makes dense int8 faster than the VNNI sparse kernels), the thread count and the shape, so the outcome
is cached beside the artifact (`auto.json`) per machine, shape and thread count, and a later session of
the same key builds only the winner. A candidate that cannot be built (e.g. the sparse kernel fails to
compile) drops out of the race, and the reason says why.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .artifact import INT8_SCHEMES, WEIGHTS, Artifact
from .backends import Runner, available_backends, build_runner
from .cpu import cpu_flags, cpu_model
from .errors import BackendError, first_line
from .inputs import synthetic_batch

AUTO = "auto"
# The 4x1 block sparsity from which `sparse` enters the race, and from which export stores the packed
# weights. Below it the sparse kernel never beat dense int8 on a whole model (2 cores, seq 128, batch 1 /
# 8, `python -m fastcpu_runtime.compare --backends native sparse`, docs/benchmarks.md): DistilBERT shape
# 0.99x / 0.95x at 50%, 1.11x / 1.15x at 60%; MiniLM-L6 shape 1.05x / 1.04x at 50%, 1.21x / 0.92x at 60%.
SPARSE_MIN_BLOCK_SPARSITY = 0.5
CHOICES = "auto.json"  # beside the artifact's files; not in its manifest, so it never breaks a checksum
RACE_ROUNDS = 5  # paired rounds; each times every candidate once, in alternating order
RACE_CALLS = 2  # calls per candidate per round, after one untimed call
_BLOCK = 4
_PREFIX = f"{AUTO} -> "


def block_sparsity_4x1(weight: torch.Tensor) -> tuple[int, int]:
    """(all-zero 4x1 blocks, all blocks) of a 2-D [out, in] weight; out is padded with zero rows to a
    multiple of 4."""
    out_features, in_features = weight.shape
    nonzero = weight != 0
    if out_features % _BLOCK:
        padding = torch.zeros(_BLOCK - out_features % _BLOCK, in_features, dtype=torch.bool)
        nonzero = torch.cat([nonzero, padding])
    blocks = nonzero.view(-1, _BLOCK, in_features).any(dim=1)  # [out / 4, in]: block holds a non-zero
    return blocks.numel() - int(blocks.sum()), blocks.numel()


def block_sparsity(weights: Iterable[torch.Tensor]) -> float | None:
    """Fraction of all-zero 4x1 blocks over all of `weights`; None if there are no blocks."""
    zero = total = 0
    for weight in weights:
        z, t = block_sparsity_4x1(weight)
        zero, total = zero + z, total + t
    return zero / total if total else None


def int8_block_sparsity(artifact: Artifact) -> float | None:
    """block_sparsity of the stored int8 weights of the artifact's quantized Linears; None if it lists
    none. Reads only those tensors from the weights file."""
    with safe_open(str(artifact.path / WEIGHTS), framework="pt") as weights:
        return block_sparsity(weights.get_tensor(f"{name}.weight") for name in artifact.quantized_modules)


def candidate_backends(artifact: Artifact) -> tuple[list[str], str]:
    """(the backends `auto` races for this artifact on this machine, fastest-guess first; why those)."""
    available = available_backends()
    dense = ["native"] if "native" in available else ["eager"]
    if artifact.scheme not in INT8_SCHEMES:
        return dense, f"scheme {artifact.scheme} is not int8, so the sparse kernel does not apply"
    sparsity = int8_block_sparsity(artifact)
    if sparsity is None:
        return dense, f"{artifact.scheme} artifact lists no quantized Linears"
    measured = f"4x1 block sparsity {sparsity:.2f} of the int8 Linears"
    if sparsity < SPARSE_MIN_BLOCK_SPARSITY:
        return dense, f"{measured} < {SPARSE_MIN_BLOCK_SPARSITY:.2f}"
    if "sparse" not in available:
        return dense, f"{measured}, but the sparse backend is not available here"
    return ["sparse", *dense], measured


def pick_backend(artifact: Artifact, batch_size: int, seq_len: int) -> tuple[str, Runner, str]:
    """(backend name, its runner built for [batch_size, seq_len], one-line reason) that `auto` chooses."""
    candidates, reason = candidate_backends(artifact)
    if len(candidates) == 1:
        return candidates[0], build_runner(candidates[0], artifact, batch_size, seq_len), reason
    key = _choice_key(candidates, batch_size, seq_len)
    cached = _read_choices(artifact).get(key)
    if cached is not None and cached["backend"] in candidates:
        name = cached["backend"]
        runner = build_runner(name, artifact, batch_size, seq_len)
        return name, runner, f"{reason}, {cached['verdict']} (cached)"
    runners, failures = {}, []
    for name in candidates:
        try:
            runners[name] = _build_and_call(name, artifact, batch_size, seq_len)
        except (BackendError, RuntimeError, OSError) as err:  # e.g. the kernel's C++ build failed
            failures.append(f"{name} failed to build ({type(err).__name__}: {_first_line(err)})")
    if not runners:
        raise BackendError(
            f"auto: no candidate backend could be built for {artifact.path}: {', '.join(failures)}"
        )
    if len(runners) == 1:
        name = next(iter(runners))
        return name, runners[name], ", ".join([reason, *failures, f"so {name}"])
    name, verdict = race(runners, artifact, batch_size, seq_len)
    if not failures:  # a race without a candidate that failed to build is not the race of this key
        _write_choice(artifact, key, {"backend": name, "verdict": verdict})
    return name, runners[name], ", ".join([reason, *failures, verdict])


@dataclass(frozen=True)
class Speed:
    median: float  # samples/s, median over rounds
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.1f} ({self.low:.1f}-{self.high:.1f})"


def race(runners: dict[str, Runner], artifact: Artifact, batch_size: int, seq_len: int) -> tuple[str, str]:
    """(the fastest runner's name, a verdict giving every candidate's samples/s with its spread)."""
    batch = synthetic_batch(artifact.input_names, batch_size, seq_len, artifact.vocab_size)
    args = tuple(batch[name] for name in artifact.input_names)
    names = list(runners)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:
            runners[name].fn(*args)  # untimed: the session's first call already ran, this evens caches
        for index in range(RACE_ROUNDS):
            for name in names if index % 2 == 0 else reversed(names):
                start = time.perf_counter()
                for _ in range(RACE_CALLS):
                    runners[name].fn(*args)
                seconds[name].append(time.perf_counter() - start)
    speeds = {name: _speed(times, batch_size * RACE_CALLS) for name, times in seconds.items()}
    winner = max(names, key=lambda name: speeds[name].median)
    timed = " vs ".join(f"{name} {speeds[name]}" for name in sorted(names, key=lambda n: -speeds[n].median))
    threads = torch.get_num_threads()
    shape = f"batch {batch_size} x seq {seq_len}, {threads} threads, {RACE_ROUNDS} paired rounds"
    return winner, f"measured {timed} samples/s at {shape}"


def _speed(round_seconds: list[float], samples_per_round: int) -> Speed:
    rates = [samples_per_round / s for s in round_seconds]
    return Speed(statistics.median(rates), min(rates), max(rates))


def _build_and_call(name: str, artifact: Artifact, batch_size: int, seq_len: int) -> Runner:
    """Build the runner and make its first call, where the compiled backends compile (and can fail)."""
    runner = build_runner(name, artifact, batch_size, seq_len)
    batch = synthetic_batch(artifact.input_names, batch_size, seq_len, artifact.vocab_size)
    with torch.inference_mode():
        runner.fn(*(batch[input_name] for input_name in artifact.input_names))
    return runner


def _first_line(err: BaseException) -> str:
    """The error's first line, without "; " (which separates a description's parts)."""
    return first_line(err).replace("; ", ", ")


def _choice_key(candidates: list[str], batch_size: int, seq_len: int) -> str:
    """What decides a race: the machine, the software, the threads, the shape and who runs."""
    flags = ",".join(sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx_vnni"))))
    parts = [cpu_model(), flags, f"torch {torch.__version__}", f"threads {torch.get_num_threads()}"]
    parts += [f"batch {batch_size}", f"seq {seq_len}", "candidates " + ",".join(sorted(candidates))]
    return " | ".join(parts)


def _read_choices(artifact: Artifact) -> dict[str, Any]:
    """The artifact's recorded races, if they belong to these weights (a stale or unreadable file is
    ignored: the race simply runs again)."""
    file = artifact.path / CHOICES
    try:
        stored = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(stored, dict) or stored.get("weights_sha256") != _weights_sha256(artifact):
        return {}
    choices = stored.get("choices")
    return choices if isinstance(choices, dict) else {}


def _write_choice(artifact: Artifact, key: str, choice: dict[str, str]) -> None:
    """Record a race's outcome atomically; a read-only artifact (e.g. inside a served model) is left alone."""
    choices = {**_read_choices(artifact), key: choice}
    data = {"weights_sha256": _weights_sha256(artifact), "choices": choices}
    staged: Path | None = None
    try:
        with tempfile.NamedTemporaryFile("w", dir=artifact.path, suffix=".tmp", delete=False) as fh:
            staged = Path(fh.name)
            json.dump(data, fh, indent=1)
        os.replace(staged, artifact.path / CHOICES)
    except OSError:
        if staged is not None:
            staged.unlink(missing_ok=True)


def _weights_sha256(artifact: Artifact) -> str | None:
    files = artifact.manifest.get("files") or {}
    return files.get(WEIGHTS)


def describe_auto(name: str, reason: str, description: str) -> str:
    """A session's description when `auto` chose its backend: "auto -> NAME: REASON; DESCRIPTION"."""
    return f"{_PREFIX}{name}: {reason}; {description}"


def backend_description(description: str) -> str:
    """The chosen backend's own description inside one `describe_auto` wrote (others unchanged)."""
    if description.startswith(_PREFIX):
        return description.split("; ", 1)[-1]  # reasons never contain "; "
    return description
