"""Gradual pruning of the encoder Linears by unit scores: the mask machinery magnitude and movement
pruning share. A unit is one weight (`unstructured`) or a 4x1 block, W[4r:4r+4, c] (`4x1`: the layout of
the sparse int8 VNNI kernels); `layer` scope prunes every Linear to the target, `global` scope drops the
lowest-scoring units of all Linears together, so layers that matter less give up more."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fastcpu_runtime.architectures import encoder_linears

from ..config import check_range
from .base import Pruner, Schedule

BLOCK = 4  # 4 consecutive output channels x 1 input channel: one VNNI 4-way int8 dot product
Pattern = Literal["unstructured", "4x1"]
Scope = Literal["layer", "global"]


@dataclass
class UnitPruning(Schedule):
    """Settings of every unit-score pruner."""

    sparsity: float = 0.8  # final fraction of zero weights over the encoder Linears
    pattern: Pattern = "4x1"
    scope: Scope = "layer"  # layer: every Linear at `sparsity`; global: one threshold over all of them

    def validate(self, key: str) -> None:
        check_range(f"{key}.sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        self.validate_schedule(key)


def unit_view(values: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Per-weight values summed into one value per pruning unit."""
    if pattern == "unstructured":
        return values
    out_features, in_features = values.shape
    if out_features % BLOCK:
        raise ValueError(f"4x1 pruning needs output features divisible by {BLOCK}, got {out_features}")
    return values.view(out_features // BLOCK, BLOCK, in_features).sum(dim=1)


def expand_units(keep: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """A keep-mask over units as a keep-mask over weights."""
    return keep.repeat_interleave(BLOCK, dim=0) if pattern == "4x1" else keep


def keep_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool keep-mask dropping exactly round(sparsity * n) of the lowest scores."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    n_pruned = round(sparsity * scores.numel())
    if n_pruned:
        keep[torch.topk(scores.flatten(), n_pruned, largest=False).indices] = False
    return keep.view_as(scores)


def select_units(scores: dict[str, torch.Tensor], sparsity: float, scope: Scope) -> dict[str, torch.Tensor]:
    """Keep-masks over units: per tensor (`layer`) or with one threshold over all of them (`global`)."""
    if scope == "layer":
        return {name: keep_top(s, sparsity) for name, s in scores.items()}
    flat = keep_top(torch.cat([s.flatten() for s in scores.values()]), sparsity)
    parts = flat.split([s.numel() for s in scores.values()])
    return {name: part.view_as(scores[name]) for name, part in zip(scores, parts, strict=True)}


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """Keep-mask (bool) of one weight zeroing exactly round(sparsity * units) lowest-L1 units."""
    return expand_units(keep_top(unit_view(weight.detach().abs().float(), pattern), sparsity), pattern)


class MaskPruner(Pruner):
    """Gradual pruning of the encoder Linears by the scores a subclass gives each unit."""

    config: UnitPruning

    def prepare(self, model: nn.Module) -> None:
        self.linears = encoder_linears(model)
        self.masks = {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in self.linears.items()}
        self.sparsity = 0.0  # the sparsity the masks were last computed for

    def unit_scores(self) -> dict[str, torch.Tensor]:
        """Importance of every unit of every Linear (higher is kept)."""
        raise NotImplementedError

    def before_step(self, step: int) -> None:
        if self.config.update_due(step, self.total_steps):
            self.update_masks(self.config.sparsity_at(step, self.total_steps, self.config.sparsity))

    def update_masks(self, sparsity: float) -> None:
        self.set_masks(select_units(self.unit_scores(), sparsity, self.config.scope), sparsity)

    def set_masks(self, keep: dict[str, torch.Tensor], sparsity: float) -> None:
        """Adopt keep-masks over units (`sparsity`: the overall fraction they prune) and zero the rest."""
        self.masks = {name: expand_units(k, self.config.pattern) for name, k in keep.items()}
        self.sparsity = sparsity
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        for name, module in self.linears.items():
            module.weight.mul_(self.masks[name])

    def after_optimizer_step(self, step: int) -> None:
        self.apply_masks()

    def finalize(self, model: nn.Module) -> dict:
        """The target reached (training may have stopped before the schedule's end) and recorded."""
        if self.sparsity != self.config.sparsity:
            self.update_masks(self.config.sparsity)
        self.apply_masks()
        per_layer = {name: 1.0 - mask.float().mean().item() for name, mask in self.masks.items()}
        return {
            "method": self.config.name,
            "pattern": self.config.pattern,
            "scope": self.config.scope,
            "target": self.config.sparsity,
            "per_layer": per_layer,
        }
