"""One-shot pruning with least-squares reconstruction (in the line of Optimal Brain Surgeon, OBC and
SparseGPT): each encoder Linear is pruned to the target in one step, and the weights it keeps are solved
to reproduce its outputs on the inputs it has seen: for every row (or 4x1 row group) with kept columns K,
W[K] = H[K,K]^-1 H[K,:] W0, with H = sum of x x^T. Where gradual magnitude pruning needs thousands of
steps to recover, this leaves only the error no choice of the kept weights could remove, so a small
fine-tuning set is enough for the rest.

The Linears' inputs are collected from the training steps between `start` and `end` (the model keeps
training meanwhile); at the `end` step every Linear is pruned at once and the masks stay frozen for the
rest of training. Units are ranked by |w| * ||x_j|| (Wanda, Sun et al., 2023; a 4x1 unit sums its 4
weights'): on correlated inputs it leaves a smaller error after the solve than magnitude, and much
smaller than the single-weight OBS saliency w^2 / [H^-1]_jj, which is blind to pruning many at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError, check_range
from .base import PRUNERS
from .masks import BLOCK, MaskPruner, UnitPruning, expand_units, magnitude_mask, unit_view


@dataclass
class ReconstructPruning(UnitPruning):
    name: str = "reconstruct"
    end: float = 0.1  # the one-shot step: inputs collected from `start` to here, masks frozen afterwards
    damping: float = 0.01  # added to H's diagonal, as a fraction of its mean: keeps the solves stable

    def validate(self, key: str) -> None:
        super().validate(key)
        check_range(f"{key}.damping", self.damping, 0.0, low_open=True)
        if self.scope != "layer":
            raise ConfigError(
                f"{key}.scope={self.scope!r}: reconstruct prunes each Linear on its own; allowed: layer"
            )


@PRUNERS.register("reconstruct", ReconstructPruning)
class ReconstructPruner(MaskPruner):
    config: ReconstructPruning

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        self.model = model
        self.hessians = {
            name: torch.zeros(m.in_features, m.in_features, device=m.weight.device)
            for name, m in self.linears.items()
        }
        self.samples = dict.fromkeys(self.linears, 0)
        self.collecting, self.hooks = False, []

    def _collector(self, name: str):
        def collect(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if self.collecting:
                rows = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                self.hessians[name].addmm_(rows.T, rows)
                self.samples[name] += rows.shape[0]

        return collect

    def before_step(self, step: int) -> None:
        start, end = self.config.steps(self.total_steps)
        if step == 0 and start < end:
            # Hooked on what the model calls now that every method is prepared (QAT may have wrapped them).
            self.hooks = [
                self.model.get_submodule(name).register_forward_pre_hook(self._collector(name))
                for name in self.linears
            ]
        self.collecting = start <= step < end
        if step == end:
            self.update_masks(self.config.sparsity)

    def update_masks(self, sparsity: float) -> None:
        """Prune every Linear to `sparsity` at once, solving the weights it keeps."""
        for hook in self.hooks:
            hook.remove()
        self.hooks, self.collecting = [], False
        for name, module in self.linears.items():
            if self.samples[name]:
                hessian = self.hessians[name] / self.samples[name]
                self.masks[name] = reconstruct(
                    module, hessian, sparsity, self.config.pattern, self.config.damping
                )
            else:  # no input seen (training ended first): plain magnitude
                self.masks[name] = magnitude_mask(module.weight, sparsity, self.config.pattern)
        self.hessians = {}
        self.sparsity = sparsity
        self.apply_masks()


@torch.no_grad()
def reconstruct(
    module: nn.Linear, hessian: torch.Tensor, sparsity: float, pattern: str, damping: float
) -> torch.Tensor:
    """Prune one Linear by |w| * ||x|| and solve its kept weights; returns the keep-mask and leaves the
    solved weights in the module."""
    weight = module.weight.detach().float()
    hessian = hessian.clone()
    saliency = unit_view(weight.abs() * hessian.diagonal().sqrt(), pattern)  # [rows or row groups, inputs]
    keep_units = keep_per_row(saliency, sparsity)
    dead = hessian.diagonal() == 0  # inputs that were always zero: nothing to reproduce
    hessian[dead, dead] = 1.0
    hessian.diagonal().add_(damping * hessian.diagonal().mean())
    solved = torch.zeros_like(weight)
    rows = BLOCK if pattern == "4x1" else 1
    targets = weight @ hessian  # row r: H w0_r, the right-hand side of every kept subset's solve
    for unit, kept in enumerate(keep_units):
        group = slice(unit * rows, (unit + 1) * rows)
        system = hessian[kept][:, kept]
        solved[group, kept] = torch.linalg.solve(system, targets[group, kept].T).T
    module.weight.copy_(solved.to(module.weight.dtype))
    return expand_units(keep_units, pattern)


def keep_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool keep-mask dropping the round(sparsity * columns) lowest scores of every row."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    n_pruned = round(sparsity * scores.shape[1])
    if n_pruned:
        keep.scatter_(1, torch.topk(scores, n_pruned, dim=1, largest=False).indices, False)
    return keep
