"""The `student` config group: the student starts as a copy of the teacher with fewer layers."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from .architectures import layer_map, transformer_layers
from .config import ConfigError


@dataclass
class StudentConfig:
    layers: list[int] | None = None  # teacher layers the student keeps, in order; null keeps all of them

    def validate(self, key: str) -> None:
        if self.layers is not None and not self.layers:
            raise ConfigError(f"{key}.layers is empty; give layer indices (e.g. [0, 2, 4]) or null for all")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ConfigError(
                f"{key}.layers={self.layers} repeats a layer; each teacher layer can be kept once"
            )

    def check_against(self, n_teacher_layers: int, key: str = "student") -> None:
        """Indices must exist in the teacher: checked as soon as the teacher's config is known."""
        bad = [i for i in self.layers or [] if not 0 <= i < n_teacher_layers]
        if bad:
            last = n_teacher_layers - 1
            raise ConfigError(
                f"{key}.layers={self.layers}: {bad} out of range; the teacher has layers 0..{last}"
            )


def make_student(teacher: nn.Module, config: StudentConfig) -> nn.Module:
    """A deep copy of the teacher keeping only the configured layers (weights included)."""
    student = copy.deepcopy(teacher)
    if config.layers is None:
        return student
    config.check_against(len(transformer_layers(student)))
    kept = nn.ModuleList([transformer_layers(student)[i] for i in config.layers])
    owner, _, attr = layer_map(student).layers.rpartition(".")
    setattr(student.base_model.get_submodule(owner), attr, kept)
    student.config.num_hidden_layers = len(kept)
    return student
