"""Fixed-shape model inputs: padding real batches and making synthetic ones.

Compiled graphs are specialised to one (batch, sequence) shape and recompile for any other, so every
call is padded up to the session's shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def pad_value(name: str, pad_token_id: int) -> int:
    return pad_token_id if name == "input_ids" else 0


def as_batch(inputs: Mapping[str, Any], input_names: list[str]) -> tuple[dict[str, torch.Tensor], int, int]:
    """Validate user inputs (int tensors [b, s], input_ids required) and return them with b and s.

    Keys the model does not take (e.g. a tokenizer's offset_mapping) are ignored; a missing attention_mask
    means "attend everywhere" and other missing inputs are zeros, as in Hugging Face.
    """
    if "input_ids" not in inputs:
        raise ValueError("inputs must contain input_ids")
    ids = torch.as_tensor(inputs["input_ids"])
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(ids.shape)}")
    out: dict[str, torch.Tensor] = {}
    for name in input_names:
        if name in inputs:
            tensor = torch.as_tensor(inputs[name]).to(torch.int64)
            if tensor.shape != ids.shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, input_ids {tuple(ids.shape)}")
        else:
            tensor = torch.ones_like(ids) if name == "attention_mask" else torch.zeros_like(ids)
        out[name] = tensor.to(torch.int64)
    return out, int(ids.shape[0]), int(ids.shape[1])


def pad_batch(
    batch: Mapping[str, torch.Tensor], batch_size: int, seq_len: int, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Pad [b, s] inputs to [batch_size, seq_len]; padding rows attend to one pad token so no row is empty."""
    out = {}
    for name, tensor in batch.items():
        b, s = tensor.shape
        if b > batch_size or s > seq_len:
            raise ValueError(f"{name} is [{b}, {s}], larger than the session shape [{batch_size}, {seq_len}]")
        padded = torch.full((batch_size, seq_len), pad_value(name, pad_token_id), dtype=torch.int64)
        padded[:b, :s] = tensor
        if name == "attention_mask":
            padded[b:, 0] = 1  # a fully masked row can turn into NaN, which would skew dynamic quant scales
        out[name] = padded
    return out


def fit_rows(batch: Mapping[str, torch.Tensor], seq_len: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Cut or pad the sequence dimension of [N, S] inputs to seq_len (used for calibration data)."""
    out = {}
    for name, tensor in batch.items():
        tensor = tensor[:, :seq_len].to(torch.int64)
        if tensor.shape[1] < seq_len:
            pad = torch.full((tensor.shape[0], seq_len - tensor.shape[1]), pad_value(name, pad_token_id))
            tensor = torch.cat([tensor, pad.to(torch.int64)], dim=1)
        out[name] = tensor
    return out


def synthetic_batch(
    input_names: list[str], batch_size: int, seq_len: int, vocab_size: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random token ids with a full attention mask: a worst-case (no padding) benchmark input."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, seq_len)
    out = {}
    for name in input_names:
        if name == "input_ids":
            out[name] = torch.randint(0, vocab_size, shape, generator=generator, dtype=torch.int64)
        elif name == "attention_mask":
            out[name] = torch.ones(shape, dtype=torch.int64)
        else:
            out[name] = torch.zeros(shape, dtype=torch.int64)
    return out
