"""Run a model over a task's evaluation features and score it.

The same function scores the teacher (a PyTorch module) and the student as deployed (a runtime
session): both are just callables from a batch of inputs to named logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .tasks.base import Features, Task

Runner = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def module_runner(model: nn.Module, output_names: tuple[str, ...]) -> Runner:
    """A Runner for a Hugging Face model in eval mode."""

    def run(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            outputs = model(**inputs)
        return {name: outputs[name].float() for name in output_names}

    model.eval()
    return run


def predict(run: Runner, features: Features, batch_size: int, description: str) -> dict[str, np.ndarray]:
    """Every output of `run` over `features`, concatenated in feature order."""
    chunks: dict[str, list[np.ndarray]] = {}
    batches = features.batches(batch_size)
    total = -(-len(features) // batch_size)
    for inputs, _ in tqdm(batches, total=total, desc=description, unit="batch", dynamic_ncols=True):
        for name, value in run(inputs).items():
            chunks.setdefault(name, []).append(value.numpy())
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def evaluate(
    run: Runner, task: Task, features: Features, batch_size: int, description: str
) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, predictions) of `run` on the task's evaluation features."""
    return task.score(predict(run, features, batch_size, description), features)
