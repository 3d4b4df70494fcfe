"""The `training` config group and the one training loop both the teacher and the student use.

The loop knows no compression method: it calls the hooks of the `Method`s it is given (fastcpu.methods)
at their points in each step, and asks the teacher's outputs only when a method needs them.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fastcpu_runtime.cpu import fast_bf16

from .config import ConfigError, check_range, store_base
from .methods import Batch, Method, ModelOutputs, Needs, model_outputs, request_attention_maps
from .tasks.base import Features, Task

log = logging.getLogger(__name__)


@dataclass
class TrainingConfig:
    epochs: float = 2.0  # passes over the training features (fractions allowed)
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 16
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of steps, then linear decay to 0
    max_grad_norm: float = 1.0
    # autocast of forward/backward (weights stay fp32). auto: bf16 where the device computes it natively
    # (~1.7x on AVX-512 BF16), fp32 elsewhere: emulated bf16 made a MiniLM step 7x slower on an AVX2 CPU
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available, else CPU
    group_by_length: bool = True  # batches of similar lengths, padding trimmed: fewer tokens, same data
    # every dropout layer's probability while training; None: the model's own. 0: students learn from the
    # teacher's soft targets, which regularize them, and a MiniLM step runs 1.8-1.9x faster on the CPU
    dropout: float | None = 0.0

    def validate(self, key: str) -> None:
        check_range(f"{key}.epochs", self.epochs, 0.0, low_open=True)
        check_range(f"{key}.max_steps", self.max_steps, 1)
        check_range(f"{key}.batch_size", self.batch_size, 1)
        check_range(f"{key}.learning_rate", self.learning_rate, 0.0, low_open=True)
        check_range(f"{key}.weight_decay", self.weight_decay, 0.0)
        check_range(f"{key}.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_range(f"{key}.max_grad_norm", self.max_grad_norm, 0.0, low_open=True)
        check_range(f"{key}.dropout", self.dropout, 0.0, 1.0, high_open=True)
        training_device(self.device, f"{key}.device")  # a GPU asked for and missing: before any work

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


@dataclass
class TrainingResult:
    summary: dict[str, float]  # steps, final (smoothed) loss
    records: list[dict]  # what each method's `finalize` returned, in the order the methods were given


store_base("training", TrainingConfig())


def training_device(setting: str, key: str = "training.device") -> torch.device:
    """The device `training.device` names; `cuda` without a GPU is an error saying what was found."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        found = "a CPU-only build of PyTorch" if torch.version.cuda is None else "no CUDA device"
        raise ConfigError(f"{key}=cuda but PyTorch {torch.__version__} finds {found}; use auto or cpu")
    return torch.device("cuda")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` has fast bf16 matmuls: a CUDA GPU that supports bf16 without emulation, or a CPU
    where oneDNN has them (fastcpu_runtime.cpu.fast_bf16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return fast_bf16()


def training_autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast `training.precision` means on `device`; an explicit bf16 that the device emulates is
    kept (the user asked for it) with a warning."""
    native = native_bf16(device)
    if precision == "bf16" and not native:
        log.warning("training.precision=bf16 on a %s without native bf16: emulated, slower than fp32", device)
    bf16 = precision == "bf16" or (precision == "auto" and native)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


class TeacherOutputs(Protocol):
    """The teacher's outputs for a batch of training rows (fastcpu.teacher_outputs: live or cached)."""

    def prepare(self, needs: Needs, autocast: torch.autocast, device: torch.device) -> None: ...

    def __call__(self, rows: torch.Tensor, inputs: dict[str, torch.Tensor], needs: Needs) -> ModelOutputs: ...

    def finish(self) -> None: ...


def _endless_batches(
    features: Features, config: TrainingConfig, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, dict, dict]]:
    """(rows, inputs, labels) forever, reshuffled every epoch; with `group_by_length`, each batch is cut
    to its longest row (the padding columns after it change nothing but the cost)."""
    while True:
        for rows, inputs, labels in features.indexed_batches(
            config.batch_size, shuffle=True, generator=generator, by_length=config.group_by_length
        ):
            yield rows, trim_padding(inputs) if config.group_by_length else inputs, labels


def trim_padding(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without the trailing columns that are padding in every row."""
    if "attention_mask" not in inputs:
        return inputs
    length = int(inputs["attention_mask"].sum(1).max())
    return {name: tensor[:, :length] for name, tensor in inputs.items()}


def _attention_for_training(model: nn.Module, device: torch.device, needs: Needs) -> str:
    """Switch the model to the attention training wants; returns the implementation to restore after.
    Attention maps need eager attention. On the CPU eager trains as fast as sdpa without dropout and
    faster with it (sdpa's backward with dropout is unfused: MiniLM, batch 16 x 160 tokens, 10-20%)."""
    attention = model.config._attn_implementation
    if needs.attentions:
        request_attention_maps(model, "student")
    elif device.type == "cpu" and attention != "eager":
        model.set_attn_implementation("eager")
    return attention


def _dropout_for_training(model: nn.Module, probability: float | None) -> dict[nn.Dropout, float]:
    """Set every dropout layer to `probability` (None: leave them); returns each one's own, to restore
    after training. Attention dropout draws a mask over [batch, heads, tokens, tokens] at every step;
    students distilled from a teacher's soft targets need that regularization less."""
    layers = [module for module in model.modules() if isinstance(module, nn.Dropout)]
    own = {layer: layer.p for layer in layers}
    if probability is not None:
        for layer in layers:
            layer.p = probability
    return own


def _optimizer(model: nn.Module, config: TrainingConfig, extra: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and LayerNorm weights (the BERT convention); the methods' own
    parameters (projections, scores) without decay either."""
    decay, no_decay = [], list(extra)
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one kernel over all tensors instead of a loop of per-tensor ops (the unfused AdamW took 14% of
    # a MiniLM step on 2 cores in a profile)
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=True)


def lr_factor(step: int, total: int, warmup_ratio: float, restarts: Sequence[int] = ()) -> float:
    """The learning rate's factor at `step`: linear warm-up over `warmup_ratio` of a segment, then linear
    decay to 0 at its end. `restarts` split training into segments that each start over (learning-rate
    rewinding, e.g. when a pruner's masks freeze)."""
    starts = [0, *sorted(r for r in set(restarts) if 0 < r < total)]
    begin = max(start for start in starts if start <= step)
    end = min([start for start in starts if start > step], default=total)
    length, offset = end - begin, step - begin
    warmup = round(warmup_ratio * length)
    if offset < warmup:
        return (offset + 1) / warmup
    return max(0.0, (length - offset) / max(1, length - warmup))


@dataclass
class Checkpoint:
    """Where a long training run saves its state every `every_s` seconds, and resumes from after an
    interruption. The caller keys `path` by everything that determines the run (fastcpu.teacher)."""

    path: Path
    every_s: float

    def save(
        self, step: int, total: int, running: float | None, model: nn.Module, optimizer, scheduler
    ) -> None:
        """Written to a temporary file and renamed: a kill mid-write leaves the previous one whole."""
        state = {
            "step": step,
            "total": total,
            "running": running,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        }
        temporary = self.path.with_name(self.path.name + ".tmp")
        torch.save(state, temporary)
        os.replace(temporary, self.path)

    def load(self, total: int) -> dict | None:
        """The saved state, or None when there is none or it belongs to a run of another length."""
        if not self.path.exists():
            return None
        state = torch.load(self.path, weights_only=True)
        if state["total"] != total:
            log.warning("ignoring %s: a run of %d steps, this one has %d", self.path, state["total"], total)
            return None
        return state


def _resume(
    checkpoint: Checkpoint | None, total: int, model: nn.Module, optimizer, scheduler, batches: Iterator
) -> tuple[int, float | None]:
    """(first step, running loss) after loading the checkpoint's state, if there is one: the batch
    order is replayed up to it (no compute) and the dropout generator restored, so the run continues
    as if never stopped."""
    state = checkpoint.load(total) if checkpoint else None
    if state is None:
        return 0, None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for _ in range(state["step"]):
        next(batches)
    torch.set_rng_state(state["rng"])
    log.info("resuming from %s at step %d of %d", checkpoint.path, state["step"], total)
    return state["step"], state["running"]


def train(
    model: nn.Module,
    task: Task,
    features: Features,
    config: TrainingConfig,
    *,
    seed: int,
    methods: Sequence[Method] = (),
    teacher: TeacherOutputs | None = None,
    description: str = "training",
    checkpoint: Checkpoint | None = None,
) -> TrainingResult:
    """Train `model` in place through the methods' whole lifecycle (fastcpu.methods), finalize included;
    returns summary figures and each method's record, in the order of `methods`. The model ends in eval
    mode on the CPU, ready for export. With a `checkpoint` (plain fine-tuning only: methods keep state of
    their own), an interrupted run resumes where it last saved."""
    if checkpoint and methods:
        raise ValueError("a checkpoint can only resume training without methods")
    device = training_device(config.device)
    generator = seed_everything(seed)
    total = config.total_steps(len(features))
    model.to(device)
    for method in methods:
        method.prepare(model)
    needs = Needs()
    for method in methods:
        needs = needs | method.needs
    if needs.teacher and teacher is None:
        raise ValueError("a method needs the teacher's outputs, but no teacher was given")
    attention = _attention_for_training(model, device, needs)
    dropout = _dropout_for_training(model, config.dropout)
    extra = [p for method in methods for p in method.parameters()]
    optimizer = _optimizer(model, config, extra)
    restarts = [step for method in methods for step in method.lr_restarts()]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, config.warmup_ratio, restarts)
    )
    autocast = training_autocast(config.precision, device)
    if needs.teacher:
        teacher.prepare(needs, autocast, device)
    batches = _endless_batches(features, config, generator)
    trained = [p for p in model.parameters() if p.requires_grad] + extra
    model.train()
    first, running = _resume(checkpoint, total, model, optimizer, scheduler, batches)
    saved_at = time.monotonic()
    progress = tqdm(
        range(first, total), desc=description, unit="step", dynamic_ncols=True, initial=first, total=total
    )
    for step in progress:
        for method in methods:
            method.before_step(step)
        rows, inputs, labels = next(batches)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        labels = {k: v.to(device) for k, v in labels.items()}
        with autocast:
            student = model_outputs(model, inputs, task.output_names, needs)
            teacher_outputs = teacher(rows, inputs, needs) if needs.teacher else None
            batch = Batch(inputs, labels, student, teacher_outputs)
            loss = task.task_loss(student.logits, labels)
            for method in methods:
                loss = method.loss(loss, batch)
        loss.backward()
        for method in methods:
            method.after_backward(step)
        nn.utils.clip_grad_norm_(trained, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for method in methods:
            method.after_optimizer_step(step)
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        progress.set_postfix(loss=f"{running:.3f}")
        if checkpoint and step + 1 < total and time.monotonic() - saved_at >= checkpoint.every_s:
            checkpoint.save(step + 1, total, running, model, optimizer, scheduler)
            saved_at = time.monotonic()
    model.eval()
    if needs.teacher:
        teacher.finish()
    # Last prepared, first finalized: a method undoes its changes before the one it wrapped.
    records = [method.finalize(model) for method in reversed(methods)][::-1]
    model.set_attn_implementation(attention)
    for layer, probability in dropout.items():
        layer.p = probability
    model.to("cpu")
    return TrainingResult({"steps": total, "final_loss": float(running)}, records)
