"""Benchmark runtime backends on an artifact, with the seed paper's multi-instance protocol.

    python -m fastcpu_runtime.compare --shape distilbert-base --sparsity 0.8 0.9 --pattern 4x1 \\
        --scheme static_int8 --batch 1 8 --seq 128 --instances-threads 1x2

Each layout NxT runs, for each backend, N processes of T threads, pinned to disjoint cores
(os.sched_setaffinity), calling their own copy of the same session at the same time; each backend has
processes of its own, so no runtime's thread pool shares a process with another's. Throughput is the sum
over instances, latency p50/p90 is over every call of every instance. Rounds alternate between the
(backend, batch) sessions so that all of them share the machine's background load; each session makes
--warmup untimed calls before its timed ones in every round, so that no backend pays for the threads the
previous one left spinning. Throughput is the median over rounds, with its min/max.

The roofline column divides the model's int8 work by the int8 GEMM peak (torch._int_mm on a large square
GEMM, at the layout's total thread count). The work is the DENSE count, 2 x sum(in x out) x seq_len per
sample over the quantized Linears, so a sparse backend, which skips the pruned blocks, can exceed 100%:
its fraction is an effective rate. Attention, softmax, LayerNorm and quantization are not counted.

The cos_vs_fp32 column is each session's accuracy: the cosine similarity of its output logits to those of
the eager fp32 backend on the same artifact, on real text (the artifact's calibration rows, then fixed
question/context pairs through its tokenizer), over the real tokens, the lowest over the outputs. It is
computed once per session, outside the timed rounds; the target for int8 backends is >= 0.99.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from .artifact import Artifact, load_artifact
from .auto import AUTO, backend_description
from .backends import available_backends, get_backend
from .bench import latency_percentiles_ms, time_calls
from .cpu import cpu_flags, cpu_model
from .errors import ArtifactError, BackendError, first_line
from .inputs import fit_rows, synthetic_batch
from .session import Session, create_session
from .synthetic import PATTERNS, SCHEMES, SHAPES, minilm_tokenizer, synthetic_model, write_synthetic_artifact

_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
_PEAK_SIZE = 2048  # square GEMM for the peaks: large enough to be compute-bound on any CPU
_PEAK_CALLS = 5
_PEAK_CALL_S = 0.2  # a call this long is compute-bound enough: stop growing the GEMM there
_PACKAGES = {  # record key: distribution (fastcpu_runtime ships inside the fastcpu distribution)
    "torch": "torch",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "nncf": "nncf",
    "fastcpu_runtime": "fastcpu",
    "ipex": "intel_extension_for_pytorch",
}

_COSINE_TARGET = 0.99  # the accuracy target for int8 backends against eager fp32
_ACCURACY_ROWS = 16  # real-text rows the accuracy column is computed on
# Real question/context pairs for the accuracy column, after the artifact's own calibration rows.
_ACCURACY_PAIRS = [
    ("Where is the Eiffel Tower?", "The Eiffel Tower stands in Paris, on the Champ de Mars by the Seine."),
    ("Who wrote Hamlet?", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("What do bees make?", "Honey bees collect nectar and turn it into honey inside the hive."),
    ("When did the war end?", "The Second World War ended in 1945 after six years of fighting."),
    ("What did the committee approve?", "The committee approved the budget after a long debate."),
    ("How much did the rainfall change?", "Rainfall in the valley doubled compared with last spring."),
    ("When does the library close?", "The library opens at nine and closes at six every weekday."),
    ("Where do the birds rest?", "Migrating birds rest on the lake every autumn before flying south."),
]
# Known, harmless library messages this command would print on every run (each instance process too):
# {logger: text of the records dropped}. Only these records are dropped, never a whole logger.
_NOISE_LOGS = {
    # torchao's optional CUDA/MX kernels (_C_mxfp8, _C_cutlass_90a) cannot load on a CPU-only torch
    "torchao": "Failed to load ",
    # torchao registers its Enums as pytree constants, which torch 2.13 deprecates
    "torch.utils._pytree": "is an Enum subclass and is now natively supported by torch.compile",
    # the ONNX exporter's registry skips torchvision ops when torchvision is not installed
    "torch.onnx._internal.exporter._registration": "torchvision is not installed. Skipping",
}
# (message regex, module regex) of known UserWarnings: inductor's int8 lowering copies a tensor
_NOISE_WARNINGS = [("To copy construct from a tensor", r"torch\._inductor\.mkldnn_lowerings")]

Key = tuple[str, int]  # (backend, batch_size)
_NOT_RUN = ("skip:", "error:")  # how an instance describes a session it could not build


@dataclass(frozen=True)
class Layout:
    """N instances of T threads each."""

    instances: int
    threads: int

    def __str__(self) -> str:
        return f"{self.instances}x{self.threads}"


def parse_layout(text: str) -> Layout:
    try:
        instances, threads = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NxT (instances x threads), got {text!r}") from None
    if instances < 1 or threads < 1:
        raise argparse.ArgumentTypeError(f"instances and threads must be >= 1, got {text!r}")
    return Layout(instances, threads)


# ------------------------------------------------------------------------------------------- noise


class _DropKnownRecords(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _silence_known_noise() -> list[tuple[logging.Logger, logging.Filter]]:
    """Drop the known library messages (_NOISE_LOGS, _NOISE_WARNINGS); returns the filters installed."""
    installed = []
    for name, text in _NOISE_LOGS.items():
        logger, dropper = logging.getLogger(name), _DropKnownRecords(text)
        logger.addFilter(dropper)
        installed.append((logger, dropper))
    for message, module in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=module)
    return installed


@contextlib.contextmanager
def known_noise_silenced() -> Iterator[None]:
    """_silence_known_noise() for the duration of the block (main() may run inside another program)."""
    with warnings.catch_warnings():
        installed = _silence_known_noise()
        try:
            yield
        finally:
            for logger, dropper in installed:
                logger.removeFilter(dropper)


# ------------------------------------------------------------------------------------------ system


def system_info() -> dict[str, Any]:
    """What the numbers depend on: CPU, the ISA extensions the kernels use, core count and versions."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "isa": [flag for flag in _ISA_FLAGS if flag in flags],
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        **{key: _version(distribution) for key, distribution in _PACKAGES.items()},
    }


def format_system(system: dict[str, Any]) -> str:
    shown = {k: " ".join(v) if isinstance(v, list) else v for k, v in system.items() if v is not None}
    return "system: " + ", ".join(f"{key} {value}" for key, value in shown.items())


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def gemm_peaks(threads: int) -> dict[str, float]:
    """GOP/s of fp32 and bf16 torch.mm and int8 torch._int_mm on one large square GEMM."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {
            "fp32": _peak(torch.mm, lambda n: (torch.randn(n, n), torch.randn(n, n))),
            "bf16": _peak(torch.mm, lambda n: (torch.randn(n, n, dtype=torch.bfloat16),) * 2),
            "int8": _peak(torch._int_mm, lambda n: (torch.randint(-127, 128, (n, n), dtype=torch.int8),) * 2),
        }
    finally:
        torch.set_num_threads(previous)


def _peak(op: Callable[..., torch.Tensor], square: Callable[[int], tuple[torch.Tensor, ...]]) -> float:
    """GOP/s of `op` on square operands of _PEAK_SIZE, or of the first smaller size (doubling from 256)
    whose call takes _PEAK_CALL_S: where a dtype has no fast kernel (bf16 and int8 without AVX-512 or
    VNNI run reference loops, minutes per 2048^3 call) the peak is as slow as it is, but measured fast."""
    size = 256
    while True:
        operands = square(size)
        op(*operands)
        start = time.perf_counter()
        op(*operands)
        if size >= _PEAK_SIZE or time.perf_counter() - start >= _PEAK_CALL_S:
            break
        size *= 2
    times = []
    for _ in range(_PEAK_CALLS):
        start = time.perf_counter()
        op(*operands)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def int8_ops_per_sample(artifact: Artifact, seq_len: int) -> int:
    """Dense multiply-add work of the quantized Linears for one sample: 2 x in x out per token."""
    state = artifact.state_dict()
    return sum(2 * state[f"{name}.weight"].numel() * seq_len for name in artifact.quantized_modules)


# ---------------------------------------------------------------------------------------- accuracy


def accuracy_inputs(artifact: Artifact, seq_len: int) -> dict[str, torch.Tensor]:
    """Up to _ACCURACY_ROWS rows of real text at seq_len: the artifact's distinct calibration rows (real
    tokenized text from its task), then _ACCURACY_PAIRS through its own tokenizer."""
    names = artifact.input_names
    rows: list[dict[str, torch.Tensor]] = []
    calibration = artifact.calibration()
    if calibration:
        stored = {n: calibration[n] for n in names if n in calibration}
        data = fit_rows(stored, seq_len, artifact.pad_token_id)
        seen = set()
        for index, ids in enumerate(data["input_ids"]):
            if len(rows) < _ACCURACY_ROWS and (key := tuple(ids.tolist())) not in seen:
                seen.add(key)
                rows.append({n: t[index] for n, t in data.items()})
    pairs = _ACCURACY_PAIRS[: _ACCURACY_ROWS - len(rows)]
    if pairs:
        questions, contexts = ([pair[i] for pair in pairs] for i in (0, 1))
        encoded = artifact.tokenizer()(
            questions, contexts, padding="max_length", truncation=True, max_length=seq_len
        )
        tensors = {n: torch.tensor(encoded[n], dtype=torch.int64) for n in names if n in encoded}
        rows += [{n: t[index] for n, t in tensors.items()} for index in range(len(pairs))]
    common = [n for n in names if all(n in row for row in rows)]
    return {n: torch.stack([row[n] for row in rows]) for n in common}


def run_rows(session: Session, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The session's outputs on every row of `inputs`, in chunks of its batch size."""
    total = inputs["input_ids"].shape[0]
    chunks = [
        session.run({n: t[start : start + session.batch_size] for n, t in inputs.items()})
        for start in range(0, total, session.batch_size)
    ]
    return {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}


def eager_reference(artifact: Artifact, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The eager fp32 backend's outputs on `inputs` (one call), whatever --backends names."""
    rows, seq = inputs["input_ids"].shape
    return create_session(artifact, "eager", batch_size=rows, seq_len=seq).run(inputs)


def logits_cosine(
    outputs: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], mask: torch.Tensor
) -> float:
    """The lowest over the outputs of the cosine similarity to the reference; token-level outputs
    ([rows, seq, ...]) count only the real (mask) tokens."""
    mask = mask.bool()
    similarities = []
    for name, want in reference.items():
        got = outputs[name]
        if want.ndim >= 2 and want.shape[:2] == mask.shape:
            got, want = got[mask], want[mask]
        similarity = torch.nn.functional.cosine_similarity(
            got.flatten().double(), want.flatten().double(), dim=0
        )
        similarities.append(float(similarity))
    return min(similarities)


# --------------------------------------------------------------------------------------- instances


def _instance_main(
    conn: Connection,
    barrier: Any,
    artifact_path: str,
    cores: list[int],
    threads: int,
    keys: list[Key],
    seq: int,
    warmup: int,
    accuracy_rows: dict[str, torch.Tensor] | None,
) -> None:
    """One pinned process: build every session once, then time them on the parent's command.

    Sends ({key: description, "skip: reason" or "error: what"}, {key: outputs on accuracy_rows}) once
    (outputs only when given rows, before any timing), then one list of call times per command. A backend
    that refuses the artifact (BackendError, one sentence) is skipped; any other exception is a crash,
    reported as an error with its traceback on stderr."""
    _silence_known_noise()
    os.sched_setaffinity(0, cores)
    artifact = load_artifact(artifact_path)
    sessions, described, outputs = {}, {}, {}
    for backend, batch in keys:
        try:
            session = create_session(artifact, backend, batch_size=batch, seq_len=seq, threads=threads)
        except BackendError as err:  # this backend cannot run this artifact: reported, not fatal
            described[(backend, batch)] = f"skip: {type(err).__name__}: {err}"
            continue
        except Exception as err:  # a crash: an error row and a failed command, after the others ran
            traceback.print_exc()
            described[(backend, batch)] = f"error: {type(err).__name__}: {first_line(err)}"
            continue
        if accuracy_rows is not None:
            outputs[(backend, batch)] = run_rows(session, accuracy_rows)
        inputs = synthetic_batch(artifact.input_names, batch, seq, artifact.vocab_size)
        time_calls(session, inputs, warmup)
        sessions[(backend, batch)] = (session, inputs)
        described[(backend, batch)] = session.description
    conn.send((described, outputs))
    while (command := conn.recv()) is not None:
        key, iterations = command
        # untimed calls first: the session before this one may have been another runtime whose idle
        # threads still spin (ONNX Runtime's do for a while), and the first calls would pay for them
        time_calls(*sessions[key], warmup)
        barrier.wait()
        conn.send(time_calls(*sessions[key], iterations))


@contextlib.contextmanager
def _start_instances(
    artifact: Artifact,
    layout: Layout,
    keys: list[Key],
    seq: int,
    warmup: int,
    accuracy_rows: dict[str, torch.Tensor],
) -> Iterator[list[Connection]]:
    """Start the layout's pinned processes (spawned: forking a process that already ran torch is unsafe);
    the first one also runs every session on accuracy_rows."""
    cores = sorted(os.sched_getaffinity(0))
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(layout.instances)
    pipes, processes = [], []
    for index in range(layout.instances):
        parent, child = context.Pipe()
        own = cores[index * layout.threads : (index + 1) * layout.threads]
        rows = accuracy_rows if index == 0 else None
        args = (child, barrier, str(artifact.path), own, layout.threads, keys, seq, warmup, rows)
        processes.append(context.Process(target=_instance_main, args=args, daemon=True))
        processes[-1].start()
        child.close()  # only the instance holds its end, so its death reaches recv() as EOFError
        pipes.append(parent)
    try:
        yield pipes
    finally:
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()


def _receive(pipe: Connection, what: str) -> Any:
    try:
        return pipe.recv()
    except EOFError:
        raise RuntimeError(f"a benchmark instance died ({what}); see its traceback above") from None


def run_layout(
    artifact: Artifact,
    layout: Layout,
    keys: list[Key],
    args: argparse.Namespace,
    accuracy: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
) -> list[dict]:
    """Time every (backend, batch) session under one NxT layout; one record per session that runs.

    `accuracy` is (real-text inputs, eager fp32 outputs on them): each record gets its cosine_vs_fp32."""
    rows, reference = accuracy
    with contextlib.ExitStack() as stack:
        # each backend in processes of its own, as when deployed: another runtime's thread pool sharing
        # the process (ONNX Runtime's) slowed the sparse kernel's batch-1 calls by up to 2x
        groups = {
            backend: stack.enter_context(
                _start_instances(
                    artifact, layout, [k for k in keys if k[0] == backend], args.seq, args.warmup, rows
                )
            )
            for backend in dict.fromkeys(backend for backend, _ in keys)
        }
        described: list[dict[Key, str]] = [{} for _ in range(layout.instances)]
        outputs: dict[Key, dict[str, torch.Tensor]] = {}
        for backend, pipes in groups.items():
            received = [
                _receive(pipe, f"layout {layout}, while creating {backend} sessions") for pipe in pipes
            ]
            for index, (descriptions, _) in enumerate(received):
                described[index].update(descriptions)
            outputs.update(received[0][1])
        mask = rows.get("attention_mask", rows["input_ids"] != artifact.pad_token_id)
        cosines = {key: logits_cosine(out, reference, mask) for key, out in outputs.items()}
        runnable = [key for key in keys if all(not d[key].startswith(_NOT_RUN) for d in described)]
        failed = []
        for key in keys:
            if key not in runnable:
                reason = next(d[key] for d in described if d[key].startswith(_NOT_RUN))
                print(f"{key[0]} batch {key[1]} {layout}: {reason}", file=sys.stderr)
                if reason.startswith("error:"):
                    failed.append(_error_record(key, layout, reason.removeprefix("error: "), args.seq))
        rounds: dict[Key, list[list[list[float]]]] = {key: [] for key in runnable}
        for index in range(args.rounds):
            for key in runnable:
                pipes = groups[key[0]]
                for pipe in pipes:
                    pipe.send((key, args.iterations))
                rounds[key].append([_receive(pipe, f"{key[0]} batch {key[1]}") for pipe in pipes])
            print(f"layout {layout}: round {index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    records = [_record(key, layout, rounds[key], described[0][key], args.seq) for key in runnable]
    for record, key in zip(records, runnable, strict=True):
        record["cosine_vs_fp32"] = cosines[key]
    return records + failed


def _session_fields(key: Key, layout: Layout, seq: int) -> dict:
    """What identifies a session's record: backend, shape and layout."""
    backend, batch = key
    return {
        "backend": backend,
        "batch_size": batch,
        "seq_len": seq,
        "instances": layout.instances,
        "threads": layout.threads,
    }


def _error_record(key: Key, layout: Layout, error: str, seq: int) -> dict:
    """The row of a backend that crashed: it appears in the table and the JSON, and fails the command."""
    return {**_session_fields(key, layout, seq), "error": error}


def _record(key: Key, layout: Layout, rounds: list[list[list[float]]], description: str, seq: int) -> dict:
    """rounds[r][i] = call times of instance i in round r."""
    batch = key[1]
    throughputs = [sum(batch * len(times) / sum(times) for times in instances) for instances in rounds]
    p50, p90 = latency_percentiles_ms([t for instances in rounds for times in instances for t in times])
    return {
        **_session_fields(key, layout, seq),
        "throughput": statistics.median(throughputs),
        "throughput_spread": [min(throughputs), max(throughputs)],
        "latency_p50_ms": p50,
        "latency_p90_ms": p90,
        "description": description,
    }


# ------------------------------------------------------------------------------------------ report


def benchmark_artifact(artifact: Artifact, backends: list[str], args: argparse.Namespace) -> list[dict]:
    """All layouts on one artifact; records carry the artifact's scheme and sparsity, and the dense int8
    work per sample for the results that ran int8 kernels (None otherwise)."""
    sparsity = artifact.manifest.get("sparsity", {})
    keys = [(backend, batch) for backend in runnable(backends, artifact) for batch in args.batch]
    ops = int8_ops_per_sample(artifact, args.seq) if artifact.quantized_modules else None
    records = []
    if keys:
        rows = accuracy_inputs(artifact, args.seq)
        accuracy = rows, eager_reference(artifact, rows)
    for layout in args.instances_threads if keys else []:
        for record in run_layout(artifact, layout, keys, args, accuracy):
            record.update(
                scheme=artifact.scheme,
                sparsity=sparsity.get("target", sparsity.get("overall", 0.0)),
                pattern=sparsity.get("pattern", "none"),
                int8_ops_per_sample=ops if _runs_int8(record.get("description", "")) else None,
            )
            records.append(record)
    return records


def _runs_int8(description: str) -> bool:
    """Backends describe their precision before the parenthesis: "native static int8 (...)", but
    "onnxruntime 1.31 fp32 (int8 weights dequantized)"; auto's reason ("auto -> native: ...; ") is skipped."""
    return " int8" in backend_description(description).split("(")[0]


def add_roofline(records: list[dict]) -> None:
    """Measure the GEMM peaks (once per total thread count, after the sessions are gone, so nothing
    competes), store them in each record and set each int8 record's fraction of the int8 peak."""
    totals = {r["instances"] * r["threads"] for r in records if r["int8_ops_per_sample"]}
    peaks = {total: gemm_peaks(total) for total in sorted(totals)}
    for total, peak in peaks.items():
        print(f"GEMM peaks at {total} threads (GOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()))
    for r in records:
        ops, peak = r["int8_ops_per_sample"], peaks.get(r["instances"] * r["threads"])
        r["int8_peak_fraction"] = r["throughput"] * ops / (peak["int8"] * 1e9) if ops else None
        r["gemm_peaks_gops"] = peak


def runnable(backends: list[str], artifact: Artifact) -> list[str]:
    """Drop the sparse backend on artifacts not pruned in 4x1 blocks: it would run, but every block."""
    pattern = artifact.manifest.get("sparsity", {}).get("pattern", "none")
    if "sparse" in backends and pattern != "4x1":
        print(f"sparse: skip: artifact pattern is {pattern!r}, the kernel needs 4x1 blocks", file=sys.stderr)
        return [backend for backend in backends if backend != "sparse"]
    return backends


def budget_choices(records: list[dict], budget_ms: float) -> dict[str, dict | None]:
    """Per backend, the highest-throughput record whose p90 latency fits the budget (None if none does)."""
    choices: dict[str, dict | None] = {}
    for record in records:
        best = choices.get(record["backend"])
        fits = record["latency_p90_ms"] <= budget_ms
        if fits and (best is None or record["throughput"] > best["throughput"]):
            choices[record["backend"]] = record
        else:
            choices.setdefault(record["backend"], None)
    return choices


def format_table(records: list[dict]) -> str:
    columns = ("scheme", "sparsity", "pattern", "backend", "batch", "NxT", "samples/s (min–max)", "p50 ms")
    columns += ("p90 ms", "int8 peak", "cos_vs_fp32")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        where = (
            f"| {r['scheme']} | {r['sparsity']:.0%} | {r['pattern']} | {r['backend']} | {r['batch_size']} |"
            f" {r['instances']}x{r['threads']} |"
        )
        if "error" in r:  # a crashed session: its row says so instead of numbers
            lines.append(f"{where} error: {r['error']} | | | | |")
            continue
        low, high = r["throughput_spread"]
        fraction = "" if r["int8_peak_fraction"] is None else f"{r['int8_peak_fraction']:.0%}"
        lines.append(
            f"{where} {r['throughput']:.1f} ({low:.1f}–{high:.1f}) | {r['latency_p50_ms']:.1f} |"
            f" {r['latency_p90_ms']:.1f} | {fraction} | {r['cosine_vs_fp32']:.4f} |"
        )
    return "\n".join(lines)


def format_accuracy(records: list[dict]) -> str | None:
    """One line naming the results below the cosine target, or None when all reach it."""
    low = [r for r in records if r["cosine_vs_fp32"] < _COSINE_TARGET]
    if not low:
        return None
    named = sorted({f"{r['backend']} batch {r['batch_size']} ({r['cosine_vs_fp32']:.4f})" for r in low})
    return f"below cosine {_COSINE_TARGET} of eager fp32 on real text: " + ", ".join(named)


def format_budget(choices: dict[str, dict | None], budget_ms: float) -> str:
    lines = [f"best throughput with p90 <= {budget_ms:g} ms:"]
    for backend, r in sorted(choices.items()):
        if r is None:
            lines.append(f"  {backend}: none fits")
        else:
            lines.append(
                f"  {backend}: {r['throughput']:.1f} samples/s at batch {r['batch_size']},"
                f" {r['instances']}x{r['threads']}, sparsity {r['sparsity']:.0%}"
                f" (p90 {r['latency_p90_ms']:.1f} ms)"
            )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- main


def artifact_parser(prog: str, doc: str, sparsities: str | int) -> argparse.ArgumentParser:
    """A command's parser (its help from its module `doc`) with the artifact source: --artifact, or a
    synthetic --shape with its --sparsity (`sparsities`: argparse nargs), --pattern and --scheme."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 1)[1],
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifact", type=Path, help="an exported artifact directory")
    source.add_argument("--shape", choices=sorted(SHAPES), help="a synthetic BERT-for-QA of this shape")
    parser.add_argument("--sparsity", type=float, nargs=sparsities, default=[0.0], help="synthetic only")
    parser.add_argument("--pattern", choices=PATTERNS, default="4x1", help="synthetic only")
    parser.add_argument("--scheme", choices=SCHEMES, default="static_int8", help="synthetic only")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = artifact_parser("python -m fastcpu_runtime.compare", __doc__, "+")
    parser.add_argument(
        "--backends", nargs="+", help=f"default: every available backend; {AUTO}: the one pick_backend picks"
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--instances-threads", type=parse_layout, nargs="+", metavar="NxT")
    parser.add_argument("--latency-budget-ms", type=float)
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed calls per session, once built and before each round"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--json", type=Path, help="write the records (a JSON list) here")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    cores = len(os.sched_getaffinity(0))
    args.instances_threads = args.instances_threads or [Layout(1, cores)]
    for layout in args.instances_threads:
        if layout.instances * layout.threads > cores:
            parser.error(f"layout {layout} needs {layout.instances * layout.threads} cores, {cores} usable")
    if args.rounds < 1 or args.iterations < 1 or args.warmup < 0:
        parser.error("--rounds and --iterations must be >= 1, --warmup >= 0")
    if not all(0.0 <= s < 1.0 for s in args.sparsity):
        parser.error("--sparsity values must be in [0, 1)")
    args.backends = args.backends or available_backends()
    for backend in args.backends:
        if backend != AUTO:
            get_backend(backend)  # BackendError listing the available ones


@contextlib.contextmanager
def artifacts_for(args: argparse.Namespace) -> Iterator[list[Artifact]]:
    """The given artifact, or one synthetic artifact per sparsity in a temporary directory."""
    if args.artifact is not None:
        yield [load_artifact(args.artifact)]
        return
    model, tokenizer = synthetic_model(args.shape), minilm_tokenizer()
    with tempfile.TemporaryDirectory(prefix="fastcpu-bench-") as directory:
        yield [
            load_artifact(
                write_synthetic_artifact(
                    Path(directory) / f"sparsity{sparsity:g}",
                    model,
                    tokenizer,
                    sparsity=sparsity,
                    pattern=args.pattern,
                    scheme=args.scheme,
                    seq_len=args.seq,
                )
            )
            for sparsity in args.sparsity
        ]


def main(argv: list[str] | None = None) -> list[dict]:
    with known_noise_silenced():
        return _main(argv)


def _main(argv: list[str] | None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_args(parser, args)
        system = system_info()
        print(format_system(system))
        with artifacts_for(args) as artifacts:
            records = [r for artifact in artifacts for r in benchmark_artifact(artifact, args.backends, args)]
    except (ArtifactError, BackendError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    measured = [r for r in records if "error" not in r]
    failed = [r for r in records if "error" in r]
    add_roofline(measured)
    for record in records:
        record["system"] = system
    print(format_table(records))
    if (below := format_accuracy(measured)) is not None:
        print(below)
    if args.latency_budget_ms is not None:
        print(format_budget(budget_choices(measured, args.latency_budget_ms), args.latency_budget_ms))
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=2))
    if failed:
        names = sorted({r["backend"] for r in failed})
        parser.exit(1, f"{parser.prog}: error: {len(failed)} session(s) crashed: {', '.join(names)}\n")
    return records


if __name__ == "__main__":
    main()
