"""Movement pruning (Sanh et al., 2020): a unit's score is how much training moves its weights away from
zero, S = -sum over steps of grad * W, accumulated from the gradients after every backward pass, so units
that fine-tuning is growing survive even when they are small. On the same cubic schedule as magnitude
pruning; at 80-90% sparsity after fine-tuning it keeps several F1 points more (the paper's SQuAD table).

Pruned weights keep their last value aside (as the masked dense weights of the paper do): a unit whose
score climbs back above the threshold returns with it, not from zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import PRUNERS
from .masks import MaskPruner, UnitPruning, unit_view


@dataclass
class MovementPruning(UnitPruning):
    name: str = "movement"


@PRUNERS.register("movement", MovementPruning)
class MovementPruner(MaskPruner):
    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        self.scores = {
            name: torch.zeros_like(m.weight, dtype=torch.float32) for name, m in self.linears.items()
        }
        self.kept_aside = {name: m.weight.detach().clone() for name, m in self.linears.items()}

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        if step >= self.config.steps(self.total_steps)[1]:
            return  # the masks are frozen: scores no longer matter
        for name, module in self.linears.items():
            if module.weight.grad is not None:
                dense = torch.where(self.masks[name], module.weight, self.kept_aside[name])
                self.scores[name].sub_(module.weight.grad.float() * dense.float())

    def unit_scores(self) -> dict[str, torch.Tensor]:
        return {name: unit_view(scores, self.config.pattern) for name, scores in self.scores.items()}

    @torch.no_grad()
    def update_masks(self, sparsity: float) -> None:
        """Set pruned weights aside before the new masks zero them; bring revived ones back."""
        old = self.masks
        for name, module in self.linears.items():
            self.kept_aside[name] = torch.where(old[name], module.weight, self.kept_aside[name])
        super().update_masks(sparsity)
        for name, module in self.linears.items():
            revived = self.masks[name] & ~old[name]
            module.weight.copy_(torch.where(revived, self.kept_aside[name], module.weight))
