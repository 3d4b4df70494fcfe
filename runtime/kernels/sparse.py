"""Python side of the 4x1 block-sparse int8 GEMM: packing, the extension build, and the public API.

Y[n, out] = X[n, in] (uint8) @ W[out, in]^T (int8) with W pruned in 4x1 blocks W[4r:4r+4, k]. The
non-zero blocks of each block-row r are gathered in groups of 4 input columns, each group a 4x4 int8 tile
that matches one VNNI 4-way dot product (see sparse_gemm.cpp).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

# one extension: the sparse GEMM, the fused attention and what they share (kernels.h; ninja tracks it)
_SOURCES = [Path(__file__).with_name(name) for name in ("sparse_gemm.cpp", "attention.cpp")]
PATHS = ("avx512_vnni", "avx2", "scalar")  # fastest first
# Caps the code path, like oneDNN's ONEDNN_MAX_CPU_ISA: to compare paths, or to run as on an older CPU.
MAX_ISA_ENV = "FASTCPU_SPARSE_MAX_ISA"
_EXT_NAME = "fastcpu_sparse_gemm"
_lock = threading.Lock()
_ext: ModuleType | None = None


def _build_dir() -> Path:
    """TORCH_EXTENSIONS_DIR if set, else fastcpu's cache ($FASTCPU_CACHE or ~/.cache/fastcpu)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    cache = Path(os.environ.get("FASTCPU_CACHE", "~/.cache/fastcpu")).expanduser()
    base = Path(root) if root else cache / "extensions"
    path = base / _EXT_NAME
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_extension() -> ModuleType:
    """Compile (first call only; cached on disk by source hash) and import the C++ extension."""
    global _ext
    if _ext is not None:  # fast path: no lock per GEMM call
        return _ext
    with _lock:
        if _ext is None:
            from torch.utils.cpp_extension import load

            # -O2, not -O3: GCC 12 at -O3 adds zmm register copies to the VNNI inner loop.
            # -fopenmp so at::parallel_for really runs in parallel (its OpenMP body is in a header).
            # No -march: each SIMD path has its own target attribute, so one binary runs on any x86-64.
            _ext = load(
                name=_EXT_NAME,
                sources=[str(source) for source in _SOURCES],
                extra_cflags=["-O2", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(_build_dir()),
                verbose=False,
            )
    return _ext


def available_paths() -> list[str]:
    """Code paths this CPU can run, fastest first: a subset of ['avx512_vnni', 'avx2', 'scalar']."""
    return list(load_extension().available_paths())


@functools.cache
def kernel_path() -> str:
    """The code path the kernels run: the fastest this CPU has, at most $FASTCPU_SPARSE_MAX_ISA.

    Anything below AVX-512 VNNI is said once per process, since it costs several times the speed."""
    cap = os.environ.get(MAX_ISA_ENV, PATHS[0])
    if cap not in PATHS:
        raise ValueError(f"{MAX_ISA_ENV}={cap!r} is not a kernel path; allowed: {', '.join(PATHS)}")
    available = available_paths()
    path = next(p for p in PATHS[PATHS.index(cap) :] if p in available)
    if path != PATHS[0]:
        why = f"capped by {MAX_ISA_ENV}={cap}" if PATHS[0] in available else "this CPU has no AVX-512 VNNI"
        log.warning("sparse int8 kernel: %s, falling back to the %s path (slower)", why, path)
    return path


@dataclass(frozen=True)
class PackedWeight:
    """A [out, in] int8 weight in 4x1 block-sparse form. Tensors only, so it can be saved with safetensors.

    row_ptr  int32 [out/4 + 1]  groups of block-row r: row_ptr[r] .. row_ptr[r+1]
    col_idx  int32 [G, 4]       the 4 input columns of each group (padding slots repeat a real column)
    values   int8  [G, 4, 4]    values[g, i, b] = W[4r + i, col_idx[g, b]] (0 in padding slots)
    row_sums int32 [out]        sum_k W[o, k], for the activation zero-point correction
    shape    int64 [2]          (out, in)
    """

    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    values: torch.Tensor
    row_sums: torch.Tensor
    shape: torch.Tensor

    # cached: reading a tensor element costs microseconds, as much as a small GEMM's whole Python overhead
    @cached_property
    def out_features(self) -> int:
        return int(self.shape[0])

    @cached_property
    def in_features(self) -> int:
        return int(self.shape[1])

    @property
    def density(self) -> float:
        """Fraction of 4x1 blocks stored, padding included (the work the kernel does relative to dense)."""
        blocks = self.out_features // 4 * self.in_features
        return self.col_idx.numel() / blocks if blocks else 0.0

    def to_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {prefix + name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> PackedWeight:
        return cls(**{name: tensors[prefix + name].contiguous() for name in _FIELDS})


_FIELDS = ("row_ptr", "col_idx", "values", "row_sums", "shape")


def pack_4x1(weight: torch.Tensor) -> PackedWeight:
    """Pack an int8 [out, in] weight (out % 4 == 0) into 4x1 block-sparse groups.

    All-zero blocks are dropped; each block-row's count is padded up to a multiple of 4 with zero blocks."""
    if weight.dtype != torch.int8 or weight.ndim != 2:
        raise TypeError(
            f"pack_4x1 expects a 2-D int8 weight, got {weight.dtype} with shape {tuple(weight.shape)}"
        )
    out, n_in = weight.shape
    if out % 4:
        raise ValueError(f"pack_4x1: out_features must be a multiple of 4 for 4x1 blocks, got {out}")
    w = weight.detach().cpu().contiguous()
    blocks = w.view(out // 4, 4, n_in)  # [R, 4, in]
    nonzero = blocks.ne(0).any(dim=1)  # [R, in]
    counts = nonzero.sum(dim=1)
    groups = (counts + 3) // 4  # pad each block-row up to a multiple of 4 blocks
    row_ptr = torch.zeros(out // 4 + 1, dtype=torch.int64)
    row_ptr[1:] = groups.cumsum(0)
    total = int(row_ptr[-1])

    col_idx = torch.zeros(total, 4, dtype=torch.int32)
    values = torch.zeros(total, 4, 4, dtype=torch.int8)
    rows, cols = nonzero.nonzero(as_tuple=True)  # row-major, so columns ascend within a block-row
    if rows.numel():
        # slot of each non-zero block within its block-row, then its (group, slot) position
        first = torch.zeros(out // 4 + 1, dtype=torch.int64)
        first[1:] = counts.cumsum(0)
        rank = torch.arange(rows.numel()) - first[rows]
        g = row_ptr[rows] + rank // 4
        b = rank % 4
        flat_cols = torch.zeros(total * 4, dtype=torch.int64)
        flat_real = torch.zeros(total * 4, dtype=torch.bool)
        flat_cols[g * 4 + b] = cols
        flat_real[g * 4 + b] = True
        # padding slots point at the group's first column (always real): the load hits a cached row, weight 0
        flat_cols = torch.where(
            flat_real, flat_cols, flat_cols.view(total, 4)[:, :1].expand(total, 4).reshape(-1)
        )
        col_idx = flat_cols.view(total, 4).to(torch.int32)
        values[g, :, b] = blocks[rows, :, cols]
    row_sums = w.to(torch.int32).sum(dim=1, dtype=torch.int32)
    return PackedWeight(
        row_ptr=row_ptr.to(torch.int32),
        col_idx=col_idx.contiguous(),
        values=values.contiguous(),
        row_sums=row_sums.contiguous(),
        shape=torch.tensor([out, n_in], dtype=torch.int64),
    )


def pack_linear(weight: torch.Tensor) -> PackedWeight:
    """pack_4x1 for any nn.Linear's int8 weight: out_features is padded with zero rows to whole 4-row
    blocks (the padded outputs are computed and dropped; their cost is under one block-row)."""
    pad = -weight.shape[0] % 4 if weight.ndim == 2 else 0
    return pack_4x1(torch.cat([weight, weight.new_zeros(pad, weight.shape[1])]) if pad else weight)


def stack_rows(packs: list[PackedWeight]) -> PackedWeight:
    """One packing whose output rows are those of `packs` in order: [W1; W2; ...] for weights that read
    the same input (a layer's query, key and value), so one kernel call computes them all."""
    if len({p.in_features for p in packs}) != 1:
        raise ValueError(f"stack_rows: the weights read different widths {[p.in_features for p in packs]}")
    offsets = [0]
    for p in packs:
        offsets.append(offsets[-1] + p.col_idx.shape[0])
    row_ptr = [p.row_ptr[:-1] + start for p, start in zip(packs, offsets, strict=False)]
    return PackedWeight(
        row_ptr=torch.cat([*row_ptr, torch.tensor([offsets[-1]], dtype=torch.int32)]).to(torch.int32),
        col_idx=torch.cat([p.col_idx for p in packs]).contiguous(),
        values=torch.cat([p.values for p in packs]).contiguous(),
        row_sums=torch.cat([p.row_sums for p in packs]).contiguous(),
        shape=torch.tensor([sum(p.out_features for p in packs), packs[0].in_features], dtype=torch.int64),
    )


def _check_x(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    if x.dtype != torch.uint8:
        raise TypeError(f"activations must be uint8, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != packed.in_features:
        raise ValueError(f"activations must be [n, {packed.in_features}], got {tuple(x.shape)}")
    return x.contiguous()


def sparse_int8_gemm(x_uint8: torch.Tensor, packed: PackedWeight, path: str | None = None) -> torch.Tensor:
    """Raw int32 accumulators Y[n, o] = sum_k x[n, k] * w[o, k]; `path` forces a code path (tests)."""
    x = _check_x(x_uint8, packed)
    p = packed
    return load_extension().sparse_int8_gemm(
        x, p.row_ptr, p.col_idx, p.values, p.out_features, path or kernel_path()
    )


def sparse_linear(
    x_uint8: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    packed: PackedWeight,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    path: str | None = None,
    gelu_out: tuple[float, int] | None = None,
) -> torch.Tensor:
    """float32 [n, out] = (x - zp) * x_scale @ (w * weight_scale)^T + bias, fused into the GEMM's stores.

    The zero point is removed as acc - zp * row_sums[o], so x stays uint8 all the way. `gelu_out`, the
    (scale, zero point) of the next Linear's input, makes it uint8 quantize(GELU(y)) instead: an FFN's
    inner activations then never exist in float32."""
    x = _check_x(x_uint8, packed)
    p = packed
    out_scale, out_zero_point = gelu_out or (0.0, 0)
    return load_extension().sparse_linear(
        x,
        float(x_scale),
        int(x_zero_point),
        p.row_ptr,
        p.col_idx,
        p.values,
        p.row_sums,
        weight_scale.to(torch.float32),
        bias,
        p.out_features,
        path or kernel_path(),
        float(out_scale),
        int(out_zero_point),
    )
