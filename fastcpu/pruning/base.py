"""What every pruning method shares: the registry of the `pruning` config group, the cubic schedule with
its frozen-mask phase, the `Pruner` base (a `Method`), and the sparsity report of a model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastcpu_runtime.architectures import ffn_width, layer_map, layers_prefix, transformer_layers

from ..config import Registry, check_range
from ..methods import Method

PRUNERS: Registry = Registry("pruning")


@dataclass
class Schedule:
    """Cubic sparsity schedule (Zhu & Gupta, 2017) over a fraction of training.

    Training runs in three phases: dense until `start`, gradual pruning until `end`, then fine-tuning with
    the masks frozen until the last step (the seed recipe's "pattern lock", oBERT's final epochs).
    """

    start: float = 0.0  # fraction of training steps at which pruning begins
    end: float = 0.7  # fraction at which the target is reached; the masks are frozen from then on
    frequency: int = 10  # optimizer steps between mask updates
    rewind_lr: bool = False  # the learning rate starts over (warm-up, decay) when the masks freeze

    def validate_schedule(self, key: str) -> None:
        check_range(f"{key}.start", self.start, 0.0, 1.0)
        check_range(f"{key}.end", self.end, self.start, 1.0)
        check_range(f"{key}.frequency", self.frequency, 1)

    def steps(self, total_steps: int) -> tuple[int, int]:
        """The (start, end) steps of the gradual phase."""
        start = round(self.start * total_steps)
        return start, max(round(self.end * total_steps), start)

    def sparsity_at(self, step: int, total_steps: int, target: float) -> float:
        """0 before the start step, `target` from the end step on, cubic in between."""
        start, end = self.steps(total_steps)
        if step < start:
            return 0.0
        if step >= end:
            return target
        progress = (step - start) / (end - start)
        return target * (1.0 - (1.0 - progress) ** 3)

    def update_due(self, step: int, total_steps: int) -> bool:
        """Masks change every `frequency` steps of the gradual phase, and once more at its end step."""
        start, end = self.steps(total_steps)
        return step == end or (start <= step < end and (step - start) % self.frequency == 0)


@dataclass
class NoPruning:
    name: str = "none"


class Pruner(Method):
    """A pruning method; this base prunes nothing and records so."""

    def __init__(self, config, total_steps: int) -> None:
        self.config = config
        self.total_steps = total_steps

    def lr_restarts(self) -> list[int]:
        """The frozen-mask phase starts over from the full learning rate when the schedule asks for it."""
        if isinstance(self.config, Schedule) and self.config.rewind_lr:
            return [self.config.steps(self.total_steps)[1]]
        return []

    def finalize(self, model: nn.Module) -> dict:
        return {"method": "none"}


PRUNERS.register("none", NoPruning)(Pruner)


def make_pruner(config, total_steps: int) -> Pruner:
    """The Pruner registered for this config's method."""
    return PRUNERS.create(config, total_steps=total_steps)


def sparsity_report(model: nn.Module) -> dict:
    """Zero fraction of every encoder Linear weight and overall, against the dense layer sizes.

    Compacted (structured) layers count their removed rows and columns as zeros, so the figure is
    comparable across methods.
    """
    config, lmap = model.config, layer_map(model)
    square, wide = config.hidden_size**2, config.hidden_size * ffn_width(config)
    dense_sizes = dict.fromkeys(lmap.attention_in, square * lmap.qkv_blocks)
    dense_sizes |= {lmap.attention_out: square, lmap.ffn_in: wide * lmap.ffn_in_blocks, lmap.ffn_out: wide}
    prefix = layers_prefix(model)
    per_layer, zeros_total, dense_total = {}, 0, 0
    for index, layer in enumerate(transformer_layers(model)):
        for path, dense in dense_sizes.items():
            nonzero = int(torch.count_nonzero(layer.get_submodule(path).weight.detach()))
            per_layer[f"{prefix}.{index}.{path}"] = 1.0 - nonzero / dense
            zeros_total += dense - nonzero
            dense_total += dense
    return {"overall": zeros_total / dense_total, "per_layer": per_layer}
