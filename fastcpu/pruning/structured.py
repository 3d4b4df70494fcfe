"""Structured pruning: whole attention heads and FFN neurons, scored by the L2 norm of their weights,
masked during training and cut out of the weights at `finalize` (faster on every backend)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fastcpu_runtime.architectures import head_dim, layer_map, sync_head_counts, transformer_layers

from ..config import check_range
from .base import PRUNERS, Pruner, Schedule


@dataclass
class StructuredPruning(Schedule):
    name: str = "structured"
    heads: float = 0.25  # fraction of attention heads removed in every layer
    ffn: float = 0.5  # fraction of FFN neurons removed in every layer

    def validate(self, key: str) -> None:
        check_range(f"{key}.heads", self.heads, 0.0, 1.0, high_open=True)
        check_range(f"{key}.ffn", self.ffn, 0.0, 1.0, high_open=True)
        self.validate_schedule(key)


def _keep_top(scores: torch.Tensor, n_removed: int) -> torch.Tensor:
    """Bool keep-mask over `scores` removing the n lowest, always keeping at least one."""
    n_removed = min(n_removed, scores.numel() - 1)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_removed > 0:
        keep[torch.topk(scores, n_removed, largest=False).indices] = False
    return keep


@PRUNERS.register("structured", StructuredPruning)
class StructuredPruner(Pruner):
    config: StructuredPruning

    def prepare(self, model: nn.Module) -> None:
        self.map = layer_map(model)
        self.head_dim = head_dim(model)
        self.layers = list(transformer_layers(model))
        self.head_keep = [torch.ones(self._n_heads(layer), dtype=torch.bool) for layer in self.layers]
        self.ffn_keep = [torch.ones(self._ffn_width(layer), dtype=torch.bool) for layer in self.layers]

    def _attention(self, layer: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
        return [layer.get_submodule(p) for p in self.map.attention_in], layer.get_submodule(
            self.map.attention_out
        )

    def _ffn(self, layer: nn.Module) -> nn.Linear:
        return layer.get_submodule(self.map.ffn_in)

    def _ffn_width(self, layer: nn.Module) -> int:
        return self._ffn(layer).out_features // self.map.ffn_in_blocks

    def _n_heads(self, layer: nn.Module) -> int:
        return self._attention(layer)[1].in_features // self.head_dim

    def _head_scores(self, layer: nn.Module) -> torch.Tensor:
        """L2 norm of each head's rows in q, k and v (one fused Linear or three) and columns in the output."""
        inputs, output = self._attention(layer)
        blocks = self.map.qkv_blocks
        rows = sum(_squares(m).view(blocks, -1, self.head_dim, m.in_features).sum((0, 2, 3)) for m in inputs)
        cols = _squares(output).view(output.out_features, -1, self.head_dim).sum((0, 2))
        return (rows + cols).sqrt().cpu()

    def _ffn_scores(self, layer: nn.Module) -> torch.Tensor:
        """L2 norm of each neuron's rows in ffn_in (both halves when gated) and column in ffn_out."""
        ffn_in, ffn_out = self._ffn(layer), layer.get_submodule(self.map.ffn_out)
        rows = _squares(ffn_in).view(self.map.ffn_in_blocks, -1, ffn_in.in_features).sum((0, 2))
        return (rows + _squares(ffn_out).sum(0)).sqrt().cpu()

    def _row_keeps(self, head_keep: torch.Tensor, ffn_keep: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Keep-masks over the rows of each attention_in Linear, of attention_out's columns, of ffn_in's
        rows and of ffn_out's columns."""
        channels = head_keep.repeat_interleave(self.head_dim)
        return (
            channels.repeat(self.map.qkv_blocks),
            channels,
            ffn_keep.repeat(self.map.ffn_in_blocks),
            ffn_keep,
        )

    def before_step(self, step: int) -> None:
        if self.config.update_due(step, self.total_steps):
            self.update_masks(step)

    def update_masks(self, step: int) -> None:
        heads = self.config.sparsity_at(step, self.total_steps, self.config.heads)
        ffn = self.config.sparsity_at(step, self.total_steps, self.config.ffn)
        for i, layer in enumerate(self.layers):
            # Once removed, a unit stays removed: its zeroed weights would score lowest anyway.
            n_heads, n_ffn = len(self.head_keep[i]), len(self.ffn_keep[i])
            self.head_keep[i] = _keep_top(self._head_scores(layer), math.floor(heads * n_heads))
            self.ffn_keep[i] = _keep_top(self._ffn_scores(layer), math.floor(ffn * n_ffn))
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        for layer, head_keep, ffn_keep in zip(self.layers, self.head_keep, self.ffn_keep, strict=True):
            qkv_rows, channels, ffn_rows, ffn_cols = self._row_keeps(head_keep, ffn_keep)
            inputs, output = self._attention(layer)
            for module in inputs:
                _mask_rows(module, qkv_rows)
            _mask_cols(output, channels)
            _mask_rows(self._ffn(layer), ffn_rows)
            _mask_cols(layer.get_submodule(self.map.ffn_out), ffn_cols)

    def after_optimizer_step(self, step: int) -> None:
        self.apply_masks()

    def finalize(self, model: nn.Module) -> dict:
        self.update_masks(self.config.steps(self.total_steps)[1])
        kept_heads, kept_ffn = [], []
        for layer, head_keep, ffn_keep in zip(self.layers, self.head_keep, self.ffn_keep, strict=True):
            qkv_rows, channels, ffn_rows, ffn_cols = self._row_keeps(head_keep, ffn_keep)
            for path in self.map.attention_in:
                _replace_linear(layer, path, rows=qkv_rows)
            _replace_linear(layer, self.map.attention_out, cols=channels)
            _replace_linear(layer, self.map.ffn_in, rows=ffn_rows)
            _replace_linear(layer, self.map.ffn_out, cols=ffn_cols)
            kept_heads.append(int(head_keep.sum()))
            kept_ffn.append(int(ffn_keep.sum()))
        sync_head_counts(model)
        return {"method": "structured", "heads_per_layer": kept_heads, "ffn_per_layer": kept_ffn}


def _squares(module: nn.Linear) -> torch.Tensor:
    return module.weight.detach().float().pow(2)


def _mask_rows(module: nn.Linear, keep: torch.Tensor) -> None:
    keep = keep.to(module.weight.device)
    module.weight.mul_(keep.unsqueeze(1))
    if module.bias is not None:
        module.bias.mul_(keep)


def _mask_cols(module: nn.Linear, keep: torch.Tensor) -> None:
    module.weight.mul_(keep.to(module.weight.device))


def _replace_linear(
    parent: nn.Module, path: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> None:
    """Swap the Linear at `path` for a smaller one holding only the kept rows/columns."""
    old = parent.get_submodule(path)
    weight = old.weight.detach()
    bias = None if old.bias is None else old.bias.detach()
    if rows is not None:
        rows = rows.to(weight.device)
        weight, bias = weight[rows], None if bias is None else bias[rows]
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    owner_path, _, attr = path.rpartition(".")
    setattr(parent.get_submodule(owner_path) if owner_path else parent, attr, new.to(weight.device))
