"""The `auto` backend name: pick the fastest backend available for an artifact, from its stored weights.

Rule: an int8 artifact whose quantized Linears are block-sparse enough (the fraction of all-zero 4x1 blocks,
4 consecutive output rows x 1 input column, the sparse kernel's unit) runs on `sparse`, unless the CPU has
AMX int8 (there dense int8 is faster); anything else runs on `native` (PT2E int8, bf16 or fp32 compiled
by inductor); `eager` where neither is available.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from safetensors import safe_open

from .artifact import INT8_SCHEMES, WEIGHTS, Artifact
from .backends import available_backends
from .cpu import cpu_flags

AUTO = "auto"
# The 4x1 block sparsity from which the block-sparse int8 kernel (sparse) beats dense int8 (native) on a
# whole model; export stores the packed weights from the same value. Measured with
# `python -m fastcpu_runtime.compare --backends native sparse` (docs/benchmarks.md; 2 cores, seq 128,
# batch 1 / 8): DistilBERT shape 0.99x / 0.95x at 50%, 1.11x / 1.15x at 60%, 1.24x / 1.38x at 70%;
# MiniLM-L6 shape 1.05x / 1.04x at 50%, 1.21x / 0.92x at 60%, 1.11x / 1.06x at 70%.
SPARSE_MIN_BLOCK_SPARSITY = 0.6
# The sparse kernels use AVX-512 VNNI. On a CPU with AMX int8 (Intel Sapphire Rapids and later), native's
# dense int8 runs on oneDNN's AMX tiles and is the faster: MiniLM-L6 shape, batch 8, seq 192, 2 threads,
# native 197 and 200 against sparse 123 and 117 samples/s at 80% 4x1, two interleaved pairs (2026-11-30,
# with BF16_SDPA attention in both).
_DENSE_WINS_WITH = "amx_int8"
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


def sparse_pays_off() -> bool:
    """Whether this CPU runs a block-sparse int8 model faster on the sparse kernels than dense on native."""
    return _DENSE_WINS_WITH not in cpu_flags()


def pick_backend(artifact: Artifact) -> tuple[str, str]:
    """(backend name, one-line reason) that `auto` resolves to for this artifact on this machine."""
    available = available_backends()
    scheme = artifact.scheme
    if scheme in INT8_SCHEMES:
        sparsity = int8_block_sparsity(artifact)
        if sparsity is None:
            fast, reason = None, f"{scheme} artifact lists no quantized Linears"
        else:
            enough = sparsity >= SPARSE_MIN_BLOCK_SPARSITY
            relation = ">=" if enough else "<"
            measured = f"4x1 block sparsity {sparsity:.2f} of the int8 Linears"
            reason = f"{measured} {relation} {SPARSE_MIN_BLOCK_SPARSITY:.2f}"
            fast = "sparse" if enough else None
            if enough and fast not in available:
                fast, reason = None, f"{reason}, but the sparse backend is not available here"
            elif enough and not sparse_pays_off():
                fast, reason = (
                    None,
                    f"{reason}, but this CPU has AMX int8, where dense int8 beats the sparse kernels",
                )
    else:
        fast, reason = None, f"scheme {scheme} is not int8, so the sparse kernel does not apply"
    if fast is not None:
        return fast, reason
    if "native" in available:
        return "native", reason
    return "eager", f"{reason}, and the native backend is not available here (it needs a C++ compiler)"


def describe_auto(name: str, reason: str, description: str) -> str:
    """A session's description when `auto` chose its backend: "auto -> NAME: REASON; DESCRIPTION"."""
    return f"{_PREFIX}{name}: {reason}; {description}"


def backend_description(description: str) -> str:
    """The chosen backend's own description inside one `describe_auto` wrote (others unchanged)."""
    if description.startswith(_PREFIX):
        return description.split("; ", 1)[-1]  # reasons never contain "; "
    return description
