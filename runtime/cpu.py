"""What this CPU offers the kernels: its model name and ISA flags, read once from /proc/cpuinfo (empty
where there is none, e.g. macOS)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache
def _first_processor() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    for line in (cpuinfo.read_text() if cpuinfo.exists() else "").splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's entry
    return fields


def cpu_model() -> str:
    return _first_processor().get("model name") or platform.processor()


def cpu_flags() -> frozenset[str]:
    return frozenset(_first_processor().get("flags", "").split())


def int8_dot_product() -> bool:
    """Whether the CPU multiplies u8 x s8 into int32 in one step (AVX-512 VNNI, AVX-VNNI or AMX). Without
    it oneDNN adds pairs of u8 x s8 products in int16 (vpmaddubsw), which saturates for full-range uint8
    activations: PyTorch's x86 quantizer then wants 7-bit activations (`reduce_range`)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def fast_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls fast here: with AVX-512 (natively with AVX-512 BF16 or AMX).
    Below it bf16 is emulated, slower than fp32."""
    import torch

    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
