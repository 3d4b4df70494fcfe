"""Gradual magnitude pruning: a unit's score is the L1 norm of its weights (the seed recipe)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PRUNERS
from .masks import MaskPruner, UnitPruning, unit_view


@dataclass
class MagnitudePruning(UnitPruning):
    name: str = "magnitude"


@PRUNERS.register("magnitude", MagnitudePruning)
class MagnitudePruner(MaskPruner):
    def unit_scores(self) -> dict[str, torch.Tensor]:
        return {
            name: unit_view(module.weight.detach().abs().float(), self.config.pattern)
            for name, module in self.linears.items()
        }
