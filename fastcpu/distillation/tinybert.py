"""TinyBERT's intermediate-layer distillation (Jiao et al., 2020): every student layer learns the hidden
states and the attention distributions of the teacher layer it is mapped to, and the embedding output
learns the teacher's. A learned linear projection lifts student states to the teacher's width when the
two differ. This gives a shallow or pruned student a signal at every token of every layer, not only at
the output logits, which matters most when the training data is small."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError, check_range
from ..methods import Batch, Needs
from .base import TERMS, DistillationTerm, TermConfig


@dataclass
class TinyBertDistillation(TermConfig):
    hidden_weight: float = 1.0  # MSE between each student layer's output and its teacher layer's
    attention_weight: float = 1.0  # KL between their attention distributions (needs eager attention)
    embedding_weight: float = 1.0  # MSE between the embedding outputs
    layer_map: list[int] | None = None  # teacher layer (1..N) per student layer; null: uniform, m*N/M

    def validate(self, key: str) -> None:
        super().validate(key)
        for name in ("hidden_weight", "attention_weight", "embedding_weight"):
            check_range(f"{key}.{name}", getattr(self, name), 0.0)
        if self.weight > 0 and not (self.hidden_weight or self.attention_weight or self.embedding_weight):
            raise ConfigError(f"{key}: hidden_weight, attention_weight and embedding_weight are all zero")


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Student layer m (1-based) learns from teacher layer m*N/M, so the last learns from the last."""
    return [round(m * teacher_layers / student_layers) for m in range(1, student_layers + 1)]


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the real (non-padding) tokens: [batch, seq, width], tokens [batch, seq]."""
    squared = (student.float() - teacher.float()).pow(2).sum(-1)
    return (squared * tokens).sum() / (tokens.sum() * student.shape[-1])


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each head's attention distribution, averaged over real query tokens."""
    teacher, student = teacher.float(), student.float()
    kl = (torch.xlogy(teacher, teacher) - teacher * torch.log(student.clamp_min(1e-12))).sum(-1)
    rows = tokens[:, None, :].expand_as(kl)
    return (kl * rows).sum() / rows.sum()


@TERMS.register("tinybert", TinyBertDistillation)
class TinyBertDistiller(DistillationTerm):
    config: TinyBertDistillation

    def __init__(self, config: TinyBertDistillation, teacher_config) -> None:
        super().__init__(config, teacher_config)
        self.needs = Needs(
            teacher=True,
            hidden_states=bool(config.hidden_weight or config.embedding_weight),
            attentions=bool(config.attention_weight),
        )

    def prepare(self, model: nn.Module) -> None:
        """Check the layer map and heads against both models; build the projections when widths differ."""
        student, teacher = model.config, self.teacher_config
        key = f"distillation.{self.config.name}"
        self.layer_map = self.config.layer_map or uniform_layer_map(
            student.num_hidden_layers, teacher.num_hidden_layers
        )
        if len(self.layer_map) != student.num_hidden_layers:
            raise ConfigError(
                f"{key}.layer_map={self.layer_map} names {len(self.layer_map)} layers, but the student has "
                f"{student.num_hidden_layers}; give one teacher layer per student layer"
            )
        outside = [t for t in self.layer_map if not 1 <= t <= teacher.num_hidden_layers]
        if outside:
            raise ConfigError(
                f"{key}.layer_map={self.layer_map}: {outside} not teacher layers; the teacher has layers "
                f"1..{teacher.num_hidden_layers} (0 is the embeddings, learned through embedding_weight)"
            )
        if self.config.attention_weight and student.num_attention_heads != teacher.num_attention_heads:
            raise ConfigError(
                f"{key}.attention_weight > 0 needs as many heads in the student as in the teacher; "
                f"they have {student.num_attention_heads} and {teacher.num_attention_heads}"
            )
        device = next(model.parameters()).device
        widths = (student.hidden_size, teacher.hidden_size)
        self.projections = nn.ModuleDict()
        if widths[0] != widths[1]:  # one for the layers and one for the embeddings, as TinyBERT does
            self.projections["hidden"] = nn.Linear(*widths).to(device)
            self.projections["embedding"] = nn.Linear(*widths).to(device)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.projections.parameters())

    def _project(self, name: str, states: torch.Tensor) -> torch.Tensor:
        return self.projections[name](states) if name in self.projections else states

    def term_loss(self, batch: Batch) -> torch.Tensor:
        tokens = batch.inputs["attention_mask"].to(torch.float32)
        student, teacher = batch.student, batch.teacher
        total = torch.zeros((), device=tokens.device)
        if self.config.embedding_weight:
            embedded = self._project("embedding", student.hidden_states[0])
            total = total + self.config.embedding_weight * masked_mse(
                embedded, teacher.hidden_states[0], tokens
            )
        pairs = list(enumerate(self.layer_map, start=1))  # (student layer, teacher layer), both 1-based
        if self.config.hidden_weight:
            hidden = sum(
                masked_mse(
                    self._project("hidden", student.hidden_states[s]), teacher.hidden_states[t], tokens
                )
                for s, t in pairs
            )
            total = total + self.config.hidden_weight * hidden / len(pairs)
        if self.config.attention_weight:
            attention = sum(
                attention_kl(student.attentions[s - 1], teacher.attentions[t - 1], tokens) for s, t in pairs
            )
            total = total + self.config.attention_weight * attention / len(pairs)
        return total

    def finalize(self, model: nn.Module) -> dict:
        return {"layer_map": self.layer_map}
