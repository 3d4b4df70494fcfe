"""The `training` config group and the one training loop both the teacher and the student use.

The loop knows nothing about particular compression methods: it takes a distillation loss, a
pruner and (through the model itself) fake quantization, and calls each at its point in a step.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .config import check_range
from .distillation import DistillationLoss
from .pruning import Pruner
from .tasks.base import Features, Task


@dataclass
class TrainingConfig:
    epochs: float = 1.0  # passes over the training features (fractions allowed)
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 16
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of steps, then linear decay to 0
    max_grad_norm: float = 1.0
    precision: Literal["fp32", "bf16"] = "bf16"  # autocast dtype of forward/backward; weights stay fp32

    def validate(self, key: str) -> None:
        check_range(f"{key}.epochs", self.epochs, 0.0, low_open=True)
        check_range(f"{key}.max_steps", self.max_steps, 1)
        check_range(f"{key}.batch_size", self.batch_size, 1)
        check_range(f"{key}.learning_rate", self.learning_rate, 0.0, low_open=True)
        check_range(f"{key}.weight_decay", self.weight_decay, 0.0)
        check_range(f"{key}.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_range(f"{key}.max_grad_norm", self.max_grad_norm, 0.0, low_open=True)

    def total_steps(self, n_samples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * math.ceil(n_samples / self.batch_size)))


def seed_everything(seed: int) -> torch.Generator:
    """Seed every generator training touches; returns the one that shuffles batches."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def logits_of(outputs, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The task's named logits from a Hugging Face model output."""
    return {name: outputs[name] for name in names}


def _endless_batches(
    features: Features, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[dict, dict]]:
    while True:
        yield from features.batches(batch_size, shuffle=True, generator=generator)


def _optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and LayerNorm weights (the BERT convention)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _linear_schedule(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(
    model: nn.Module,
    task: Task,
    features: Features,
    config: TrainingConfig,
    *,
    seed: int,
    loss_fn: DistillationLoss,
    teacher: nn.Module | None = None,
    pruner: Pruner | None = None,
    description: str = "training",
) -> dict[str, float]:
    """Train `model` in place; returns summary figures (steps, final loss)."""
    generator = seed_everything(seed)
    total = config.total_steps(len(features))
    optimizer = _optimizer(model, config)
    scheduler = _linear_schedule(optimizer, round(config.warmup_ratio * total), total)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bf16")
    batches = _endless_batches(features, config.batch_size, generator)
    model.train()
    if teacher is not None:
        teacher.eval()
    running = None
    progress = tqdm(range(total), desc=description, unit="step", dynamic_ncols=True)
    for step in progress:
        if pruner is not None:
            pruner.update(step)
        inputs, labels = next(batches)
        with autocast:
            student_logits = logits_of(model(**inputs), task.output_names)
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = logits_of(teacher(**inputs), task.output_names)
            loss = loss_fn(task.task_loss(student_logits, labels), student_logits, teacher_logits)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if pruner is not None:
            pruner.apply_masks()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        progress.set_postfix(loss=f"{running:.3f}")
    model.eval()
    return {"steps": total, "final_loss": float(running)}
