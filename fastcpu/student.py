"""The `student` config group: the student starts as a copy of the teacher with fewer layers."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

from fastcpu_runtime.architectures import family_layer_map, layer_map, transformer_layers

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

    def check_against(self, teacher_config: Any, key: str = "student") -> None:
        """Indices must exist in the teacher, and its family must be able to drop them: checked as soon
        as the teacher's config is known."""
        last = teacher_config.num_hidden_layers - 1
        bad = [i for i in self.layers or [] if not 0 <= i <= last]
        if bad:
            raise ConfigError(
                f"{key}.layers={self.layers}: {bad} out of range; the teacher has layers 0..{last}"
            )
        family = teacher_config.model_type
        if self.layers is not None and 0 not in self.layers and family_layer_map(family).first_layer_required:
            raise ConfigError(
                f"{key}.layers={self.layers} drops layer 0, which a {family} model cannot do (its layer 0 "
                "is built differently from the others); keep layer 0, e.g. [0, ...]"
            )


def make_student(teacher: nn.Module, config: StudentConfig) -> nn.Module:
    """A deep copy of the teacher keeping only the configured layers (weights included)."""
    student = copy.deepcopy(teacher)
    if config.layers is None:
        return student
    config.check_against(student.config)
    kept = nn.ModuleList([transformer_layers(student)[i] for i in config.layers])
    lmap = layer_map(student)
    owner, _, attr = lmap.layers.rpartition(".")
    setattr(student.base_model.get_submodule(owner), attr, kept)
    student.config.num_hidden_layers = len(kept)
    for name in lmap.per_layer_config:  # e.g. ModernBERT's layer_types: one entry per kept layer
        setattr(student.config, name, [getattr(student.config, name)[i] for i in config.layers])
    return student
