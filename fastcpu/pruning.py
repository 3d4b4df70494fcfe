"""The `pruning` config group: gradual magnitude pruning (unstructured or 4x1 blocks) and structured
pruning of attention heads and FFN neurons.

Every method yields a `Pruner`: the training loop calls `update(step)` before each step and
`apply_masks()` after each optimizer step, so pruned weights stay zero; masks freeze after the end
step (the "pattern lock" of the seed recipe). `finalize()` runs before export: structured pruning
physically cuts the removed heads and neurons out of the weights there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .architectures import encoder_linears, head_dim, layer_map, transformer_layers
from .config import Registry, check_range

PRUNERS: Registry = Registry("pruning")

BLOCK = 4  # 4 consecutive output channels x 1 input channel: one VNNI 4-way int8 dot product


@dataclass
class Schedule:
    """Cubic sparsity schedule (Zhu & Gupta, 2017) over a fraction of training."""

    start: float = 0.0  # fraction of training steps at which pruning begins
    end: float = 0.7  # fraction at which the target is reached; masks are frozen afterwards
    frequency: int = 10  # optimizer steps between mask updates

    def validate_schedule(self, key: str) -> None:
        check_range(f"{key}.start", self.start, 0.0, 1.0)
        check_range(f"{key}.end", self.end, self.start, 1.0)
        check_range(f"{key}.frequency", self.frequency, 1)


def cubic_sparsity(step: int, total_steps: int, target: float, schedule: Schedule) -> float:
    """Sparsity at `step`: 0 before the start step, `target` from the end step on, cubic in between."""
    start = round(schedule.start * total_steps)
    end = max(round(schedule.end * total_steps), start)
    if step < start:
        return 0.0
    if step >= end:
        return target
    progress = (step - start) / (end - start)
    return target * (1.0 - (1.0 - progress) ** 3)


@dataclass
class NoPruning:
    name: str = "none"


@dataclass
class MagnitudePruning(Schedule):
    name: str = "magnitude"
    sparsity: float = 0.8  # final fraction of zero weights in every encoder Linear
    pattern: Literal["unstructured", "4x1"] = "4x1"  # 4x1: 4 output channels x 1 input channel blocks

    def validate(self, key: str) -> None:
        check_range(f"{key}.sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        self.validate_schedule(key)


@dataclass
class StructuredPruning(Schedule):
    name: str = "structured"
    heads: float = 0.25  # fraction of attention heads removed in every layer
    ffn: float = 0.5  # fraction of FFN neurons removed in every layer

    def validate(self, key: str) -> None:
        check_range(f"{key}.heads", self.heads, 0.0, 1.0, high_open=True)
        check_range(f"{key}.ffn", self.ffn, 0.0, 1.0, high_open=True)
        self.validate_schedule(key)


class Pruner:
    """Holds the masks of one model; the base class prunes nothing."""

    def __init__(self, model: nn.Module, total_steps: int) -> None:
        self.model = model
        self.total_steps = total_steps

    def update(self, step: int) -> None:
        """Recompute masks when the schedule says so (no-op by default)."""

    def apply_masks(self) -> None:
        """Zero the pruned weights again (after every optimizer step)."""

    def finalize(self) -> dict:
        """Make pruning permanent before export; returns what the manifest should record."""
        return {"method": "none"}


def _mask_update_due(step: int, total_steps: int, schedule: Schedule) -> bool:
    """Masks change every `frequency` steps inside the schedule, and once more at the end step."""
    start = round(schedule.start * total_steps)
    end = max(round(schedule.end * total_steps), start)
    return step == end or (start <= step < end and (step - start) % schedule.frequency == 0)


@PRUNERS.register("none", NoPruning)
def no_pruner(config: NoPruning, model: nn.Module, total_steps: int) -> Pruner:
    return Pruner(model, total_steps)


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """Keep-mask (bool) zeroing exactly round(sparsity * n) of the lowest-magnitude units.

    A unit is one weight (unstructured) or one 4x1 block, W[4r:4r+4, c], scored by its L1 norm.
    """
    out_features, in_features = weight.shape
    scores = weight.detach().abs().float()
    if pattern == "4x1":
        if out_features % BLOCK:
            raise ValueError(f"4x1 pruning needs output features divisible by {BLOCK}, got {out_features}")
        scores = scores.view(out_features // BLOCK, BLOCK, in_features).sum(dim=1)
    n_pruned = round(sparsity * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if n_pruned:
        keep[torch.topk(scores.flatten(), n_pruned, largest=False).indices] = False
    keep = keep.view_as(scores)
    return keep.repeat_interleave(BLOCK, dim=0) if pattern == "4x1" else keep


class MagnitudePruner(Pruner):
    """Gradual magnitude pruning of every encoder Linear to the same sparsity."""

    def __init__(self, config: MagnitudePruning, model: nn.Module, total_steps: int) -> None:
        super().__init__(model, total_steps)
        self.config = config
        self.linears = encoder_linears(model)
        self.masks = {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in self.linears.items()}

    def update(self, step: int) -> None:
        if not _mask_update_due(step, self.total_steps, self.config):
            return
        sparsity = cubic_sparsity(step, self.total_steps, self.config.sparsity, self.config)
        for name, module in self.linears.items():
            self.masks[name] = magnitude_mask(module.weight, sparsity, self.config.pattern)
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        for name, module in self.linears.items():
            module.weight.mul_(self.masks[name])

    def finalize(self) -> dict:
        self.update(max(round(self.config.end * self.total_steps), 0))
        self.apply_masks()
        return {"method": "magnitude", "pattern": self.config.pattern, "target": self.config.sparsity}


@PRUNERS.register("magnitude", MagnitudePruning)
def magnitude_pruner(config: MagnitudePruning, model: nn.Module, total_steps: int) -> Pruner:
    return MagnitudePruner(config, model, total_steps)


def _keep_top(scores: torch.Tensor, n_removed: int) -> torch.Tensor:
    """Bool keep-mask over `scores` removing the n lowest, always keeping at least one."""
    n_removed = min(n_removed, scores.numel() - 1)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_removed > 0:
        keep[torch.topk(scores, n_removed, largest=False).indices] = False
    return keep


class StructuredPruner(Pruner):
    """Removes whole attention heads and FFN neurons, scored by the L2 norm of their weights."""

    def __init__(self, config: StructuredPruning, model: nn.Module, total_steps: int) -> None:
        super().__init__(model, total_steps)
        self.config = config
        self.map = layer_map(model)
        self.head_dim = head_dim(model)
        self.layers = list(transformer_layers(model))
        self.head_keep = [torch.ones(self._n_heads(layer), dtype=torch.bool) for layer in self.layers]
        self.ffn_keep = [torch.ones(self._ffn(layer).out_features, dtype=torch.bool) for layer in self.layers]

    def _attention(self, layer: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
        return [layer.get_submodule(p) for p in self.map.attention_in], layer.get_submodule(
            self.map.attention_out
        )

    def _ffn(self, layer: nn.Module) -> nn.Linear:
        return layer.get_submodule(self.map.ffn_in)

    def _n_heads(self, layer: nn.Module) -> int:
        return self._attention(layer)[1].in_features // self.head_dim

    def _head_scores(self, layer: nn.Module) -> torch.Tensor:
        inputs, output = self._attention(layer)
        rows = sum(_squares(m).view(-1, self.head_dim, m.in_features).sum((1, 2)) for m in inputs)
        cols = _squares(output).view(output.out_features, -1, self.head_dim).sum((0, 2))
        return (rows + cols).sqrt()

    def _ffn_scores(self, layer: nn.Module) -> torch.Tensor:
        ffn_in, ffn_out = self._ffn(layer), layer.get_submodule(self.map.ffn_out)
        return (_squares(ffn_in).sum(1) + _squares(ffn_out).sum(0)).sqrt()

    def update(self, step: int) -> None:
        if not _mask_update_due(step, self.total_steps, self.config):
            return
        heads = cubic_sparsity(step, self.total_steps, self.config.heads, self.config)
        ffn = cubic_sparsity(step, self.total_steps, self.config.ffn, self.config)
        for i, layer in enumerate(self.layers):
            # Once removed, a unit stays removed: its zeroed weights would score lowest anyway.
            n_heads, n_ffn = len(self.head_keep[i]), len(self.ffn_keep[i])
            self.head_keep[i] = _keep_top(self._head_scores(layer), math.floor(heads * n_heads))
            self.ffn_keep[i] = _keep_top(self._ffn_scores(layer), math.floor(ffn * n_ffn))
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        for layer, head_keep, ffn_keep in zip(self.layers, self.head_keep, self.ffn_keep, strict=True):
            channel_keep = head_keep.repeat_interleave(self.head_dim)
            inputs, output = self._attention(layer)
            for module in inputs:
                _mask_rows(module, channel_keep)
            output.weight.mul_(channel_keep)
            _mask_rows(self._ffn(layer), ffn_keep)
            layer.get_submodule(self.map.ffn_out).weight.mul_(ffn_keep)

    def finalize(self) -> dict:
        self.update(max(round(self.config.end * self.total_steps), 0))
        kept_heads, kept_ffn = [], []
        for layer, head_keep, ffn_keep in zip(self.layers, self.head_keep, self.ffn_keep, strict=True):
            channel_keep = head_keep.repeat_interleave(self.head_dim)
            for path in self.map.attention_in:
                _replace_linear(layer, path, rows=channel_keep)
            _replace_linear(layer, self.map.attention_out, cols=channel_keep)
            _replace_linear(layer, self.map.ffn_in, rows=ffn_keep)
            _replace_linear(layer, self.map.ffn_out, cols=ffn_keep)
            kept_heads.append(int(head_keep.sum()))
            kept_ffn.append(int(ffn_keep.sum()))
        return {"method": "structured", "heads_per_layer": kept_heads, "ffn_per_layer": kept_ffn}


def _squares(module: nn.Linear) -> torch.Tensor:
    return module.weight.detach().float().pow(2)


def _mask_rows(module: nn.Linear, keep: torch.Tensor) -> None:
    module.weight.mul_(keep.unsqueeze(1))
    if module.bias is not None:
        module.bias.mul_(keep)


def _replace_linear(
    parent: nn.Module, path: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> None:
    """Swap the Linear at `path` for a smaller one holding only the kept rows/columns."""
    old = parent.get_submodule(path)
    weight = old.weight.detach()
    bias = None if old.bias is None else old.bias.detach()
    if rows is not None:
        weight, bias = weight[rows], None if bias is None else bias[rows]
    if cols is not None:
        weight = weight[:, cols]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    owner_path, _, attr = path.rpartition(".")
    setattr(parent.get_submodule(owner_path) if owner_path else parent, attr, new)


@PRUNERS.register("structured", StructuredPruning)
def structured_pruner(config: StructuredPruning, model: nn.Module, total_steps: int) -> Pruner:
    return StructuredPruner(config, model, total_steps)


def make_pruner(config, model: nn.Module, total_steps: int) -> Pruner:
    """The Pruner registered for this config's method."""
    return PRUNERS.implementation(config)(config, model, total_steps)


def sparsity_report(model: nn.Module) -> dict:
    """Zero fraction of every encoder Linear weight and overall, against the dense layer sizes.

    Compacted (structured) layers count their removed rows and columns as zeros, so the figure is
    comparable across methods.
    """
    config, lmap = model.config, layer_map(model)
    square, wide = config.hidden_size**2, config.hidden_size * config.intermediate_size
    dense_sizes = {**dict.fromkeys([*lmap.attention_in, lmap.attention_out], square), lmap.ffn_in: wide}
    dense_sizes[lmap.ffn_out] = wide
    prefix = f"{model.base_model_prefix}.{lmap.layers}"
    per_layer, zeros_total, dense_total = {}, 0, 0
    for index, layer in enumerate(transformer_layers(model)):
        for path, dense in dense_sizes.items():
            nonzero = int(torch.count_nonzero(layer.get_submodule(path).weight.detach()))
            per_layer[f"{prefix}.{index}.{path}"] = 1.0 - nonzero / dense
            zeros_total += dense - nonzero
            dense_total += dense
    return {"overall": zeros_total / dense_total, "per_layer": per_layer}
