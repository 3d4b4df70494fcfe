"""CPU kernels built on first use as PyTorch C++ extensions.

`sparse_gemm`: int8 GEMM for weights pruned in 4x1 blocks (4 consecutive output channels x 1 input channel),
with AVX-512 VNNI, AVX2 and scalar code paths chosen at run time from the CPU's features.
"""

from .sparse import (
    PackedWeight,
    available_paths,
    kernel_path,
    load_extension,
    pack_4x1,
    pack_linear,
    sparse_int8_gemm,
    sparse_linear,
    stack_rows,
)

__all__ = [
    "PackedWeight",
    "available_paths",
    "kernel_path",
    "load_extension",
    "pack_4x1",
    "pack_linear",
    "sparse_int8_gemm",
    "sparse_linear",
    "stack_rows",
]
