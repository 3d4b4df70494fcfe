"""Symmetric per-output-channel int8 weight codec shared by the exporter and the runtime.

Both sides must use the same rounding and scale convention, so it lives here and nowhere else.
"""

import torch

INT8_MAX = 127


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a [out, in] weight to int8 with one float32 scale per output row.

    scale = max|w| / 127 per row; all-zero rows (e.g. pruned neurons) get scale 1.0 to avoid dividing by 0.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale[:, None]), -INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), scale.to(torch.float32).contiguous()


def dequantize_per_channel(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Invert `quantize_per_channel` (up to rounding): w ≈ q * scale[:, None]."""
    if q.ndim != 2 or scale.shape != (q.shape[0],):
        raise ValueError(f"int8 weight {tuple(q.shape)} and scale {tuple(scale.shape)} do not match")
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)
