"""The `distillation` config group: the training objective as a weighted sum of the task loss and any
registered distillation terms, e.g.

    task_weight: 0.5              # weight of the task loss on the labels
    logit_kd: {weight: 0.5, ...}  # one key per term, named as registered in TERMS

A term is a `DistillationTerm` (a `Method` with a weight) registered with its config class; the
`Distiller` adds the weighted terms to the task loss and forwards every other hook to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, Registry, check_range, coerce, to_plain
from ..methods import Batch, Method, Needs

TERMS: Registry = Registry("distillation")


@dataclass
class TermConfig:
    """What every term's config has: its name (the key it is given under) and its weight."""

    name: str = ""
    weight: float = 1.0  # weight of this term in the loss

    def validate(self, key: str) -> None:
        check_range(f"{key}.weight", self.weight, 0.0)


@dataclass
class DistillationConfig:
    task_weight: float = 1.0  # weight of the task loss on the labels
    terms: dict[str, Any] = field(default_factory=dict)  # term name -> its config


def build_distillation(node: Any, key: str = "distillation") -> DistillationConfig:
    """The config from `{task_weight: ..., <term>: {...}, ...}`; one ConfigError for anything wrong."""
    node = dict(to_plain(node) or {})
    task_weight = coerce(node.pop("task_weight", 1.0), float, f"{key}.task_weight")
    check_range(f"{key}.task_weight", task_weight, 0.0)
    terms = {}
    for name, settings in node.items():
        if name not in TERMS.names:
            raise ConfigError(
                f"{key}.{name} is not a distillation term; allowed: task_weight, {', '.join(TERMS.names)}"
            )
        if not isinstance(settings, dict):
            raise ConfigError(f"{key}.{name} must be a mapping of the term's settings, got {settings!r}")
        terms[name] = TERMS.build({**settings, "name": name}, f"{key}.{name}")
    if task_weight == 0 and not any(term.weight > 0 for term in terms.values()):
        raise ConfigError(
            f"{key}: every weight of the loss is zero (task_weight and "
            f"{', '.join(f'{name}.weight' for name in terms) or 'no term'}); give at least one a weight > 0"
        )
    return DistillationConfig(task_weight, terms)


class DistillationTerm(Method):
    """One weighted term of the objective; `term_loss` is its unweighted value for a batch."""

    def __init__(self, config: TermConfig, teacher_config: Any) -> None:
        self.config = config
        self.teacher_config = teacher_config  # the teacher's model config (layers, widths, heads)

    def term_loss(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError


class Distiller(Method):
    """task_weight * task loss + sum of weight * term; every hook reaches every term with a weight."""

    def __init__(self, config: DistillationConfig, teacher_config: Any) -> None:
        self.task_weight = config.task_weight
        self.terms: list[DistillationTerm] = [
            TERMS.create(term, teacher_config=teacher_config)
            for term in config.terms.values()
            if term.weight > 0
        ]
        self.needs = Needs()
        for term in self.terms:
            self.needs = self.needs | term.needs

    def prepare(self, model: nn.Module) -> None:
        for term in self.terms:
            term.prepare(model)

    def parameters(self) -> list[nn.Parameter]:
        return [p for term in self.terms for p in term.parameters()]

    def loss(self, loss: torch.Tensor, batch: Batch) -> torch.Tensor:
        total = self.task_weight * loss
        for term in self.terms:
            total = total + term.config.weight * term.term_loss(batch)
        return total

    def finalize(self, model: nn.Module) -> dict:
        return {term.config.name: term.finalize(model) for term in self.terms}
