"""The lifecycle every compression method shares, so the training loop never changes for a new one.

A method (a pruner, a distillation, a quantization scheme) is one object built from its config by the
registry of its config group. The loop (`fastcpu.training.train`) calls its hooks in this order:

    prepare(model)                 once, on the training device: swap modules, allocate masks or scores
    parameters()                   extra trainable tensors (projections, scores) the optimizer updates
    lr_restarts()                  steps where the learning-rate schedule starts over (rewinding)
    needs                          what the student and the teacher must return (hidden states, ...)
    for each step:
        before_step(step)          e.g. recompute masks on the pruning schedule
        forward of the student (and the teacher, or its cached outputs)
        loss = method.loss(loss, batch), in turn: each may reweight the task loss or add a term
        backward
        after_backward(step)       gradients exist: movement scores accumulate here
        optimizer step
        after_optimizer_step(step) e.g. re-zero the pruned weights
    finalize(model) -> dict        once, after training and before export: what the manifest records

Every hook does nothing by default, so a method overrides only the points it acts at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError


@dataclass(frozen=True)
class Needs:
    """What a method needs the training step to compute."""

    teacher: bool = False  # the teacher's outputs for the same batch
    hidden_states: bool = False  # the embedding output and every layer's output, student and teacher
    attentions: bool = False  # every layer's attention probabilities (eager attention)

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            teacher=self.teacher or other.teacher,
            hidden_states=self.hidden_states or other.hidden_states,
            attentions=self.attentions or other.attentions,
        )


@dataclass
class ModelOutputs:
    """One forward pass: the task's named logits and, when asked for, hidden states and attentions."""

    logits: dict[str, torch.Tensor]
    hidden_states: tuple[torch.Tensor, ...] | None = None  # [batch, seq, hidden]: embeddings, then layers
    attentions: tuple[torch.Tensor, ...] | None = None  # [batch, heads, seq, seq] per layer


@dataclass
class Batch:
    """What a method's `loss` sees of the step."""

    inputs: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    student: ModelOutputs
    teacher: ModelOutputs | None


class Method:
    """A compression method's hooks into training; each does nothing unless overridden."""

    needs: Needs = Needs()

    def prepare(self, model: nn.Module) -> None:
        """Set the model up for training with this method (called once, on the training device)."""

    def parameters(self) -> list[nn.Parameter]:
        """Trainable tensors of the method's own, beside the model's."""
        return []

    def lr_restarts(self) -> list[int]:
        """Steps at which the learning-rate schedule starts over (warm-up, then decay to 0)."""
        return []

    def before_step(self, step: int) -> None:
        """Called before the forward pass of `step` (0-based)."""

    def loss(self, loss: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The loss after this method: `loss` is the task loss as reweighted by the methods before it."""
        return loss

    def after_backward(self, step: int) -> None:
        """Called once the gradients of `step` exist, before clipping and the optimizer step."""

    def after_optimizer_step(self, step: int) -> None:
        """Called after the optimizer has updated the weights."""

    def finalize(self, model: nn.Module) -> dict:
        """Make the method's effect permanent before export; returns what the manifest records."""
        return {}


def model_outputs(
    model: nn.Module, inputs: dict[str, torch.Tensor], names: Sequence[str], needs: Needs
) -> ModelOutputs:
    """One forward pass returning the task's named logits and what `needs` asks for."""
    outputs = model(**inputs, output_hidden_states=needs.hidden_states, output_attentions=needs.attentions)
    return ModelOutputs(
        logits={name: outputs[name] for name in names},
        hidden_states=outputs.hidden_states if needs.hidden_states else None,
        attentions=outputs.attentions if needs.attentions else None,
    )


def request_attention_maps(model: nn.Module, who: str) -> None:
    """Attention maps come only from eager attention (sdpa returns none): switch to it, or say that this
    model cannot give them."""
    if model.config._attn_implementation == "eager":
        return
    try:
        model.set_attn_implementation("eager")
    except (ValueError, AttributeError, NotImplementedError) as error:
        raise ConfigError(
            f"attention distillation needs the {who}'s attention maps, but this {model.config.model_type} "
            f"model cannot return them ({error}); set the term's attention_weight to 0"
        ) from error
