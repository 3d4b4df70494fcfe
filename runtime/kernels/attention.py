"""Fused CPU attention for encoders: softmax(Q K^T * scale) V per (batch, head) in one kernel call.

The scores of a query row stay in a buffer of the kernel (no [B, H, S, S] tensor), the padding mask is the
[B, S] key mask itself, and keys after a sequence's last real token are never read (attention.cpp)."""

from __future__ import annotations

import torch

from .sparse import kernel_path, load_extension


@torch.library.custom_op("fastcpu::attention", mutates_args=())
def fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """float32 [B, S, H, D] from query/key/value [B, H, S, D]; key_mask bool [B, S] (True = attend) or None.

    Vectorized where the sparse kernel runs AVX-512 (head sizes that are multiples of 16, up to 128);
    scalar loops otherwise. A query whose keys are all masked gets zeros."""
    mask = torch.empty(0, dtype=torch.bool) if key_mask is None else key_mask
    vectorized = kernel_path() == "avx512_vnni"
    return load_extension().fused_attention(query, key, value, mask, scale, vectorized)


@fused_attention.register_fake
def _fused_attention_fake(query, key, value, key_mask, scale):
    batch, heads, seq, dim = query.shape
    return query.new_empty((batch, seq, heads, dim))


__all__ = ["fused_attention"]
