"""Where a distilling student gets the teacher's outputs: a forward pass at every step (`LiveTeacher`), or
outputs computed once for every training row and reused by every trial that trains on the same rows with
the same teacher (`CachedTeacher`: in memory, and on disk under `teacher.cache_dir/outputs`).

The cache key hashes everything the outputs depend on: the teacher's weights, the tokenized training rows,
which outputs are stored, the autocast precision and fastcpu's version. Each file's sha256 is recorded
beside it; a file that no longer matches is recomputed, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from fastcpu_runtime.artifact import sha256_file

from . import __version__
from .methods import ModelOutputs, Needs, model_outputs, request_attention_maps
from .tasks.base import Features
from .teacher import exclusive, tensors_digest, weights_digest

log = logging.getLogger(__name__)


class LiveTeacher:
    """Teacher outputs from a forward pass at every step."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        self.model, self.names = model, names

    def prepare(self, needs: Needs, autocast: torch.autocast, device: torch.device) -> None:
        self.model.eval().to(device)
        self.attention = self.model.config._attn_implementation
        if needs.attentions:
            request_attention_maps(self.model, "teacher")

    def __call__(self, rows: torch.Tensor, inputs: dict[str, torch.Tensor], needs: Needs) -> ModelOutputs:
        with torch.no_grad():
            return model_outputs(self.model, inputs, self.names, needs)

    def finish(self) -> None:
        """The teacher as it was (sdpa attention, on the CPU) for whoever uses it next."""
        self.model.set_attn_implementation(self.attention)
        self.model.to("cpu")


def stored_bytes(model: nn.Module, names: tuple[str, ...], features: Features, needs: Needs) -> int:
    """Bytes the cached outputs take (fp32 logits, bf16 hidden states and attentions), from one row."""
    device = next(model.parameters()).device
    with torch.no_grad():
        first = model_outputs(model, {k: v[:1].to(device) for k, v in features.inputs.items()}, names, needs)
    per_row = sum(t.numel() * (4 if name in names else 2) for name, t in _flatten(first).items())
    return per_row * len(features)


class CachedTeacher(LiveTeacher):
    """Teacher outputs for every training row, computed once per teacher and data and read by row."""

    _memory: dict[str, dict[str, torch.Tensor]] = {}  # the last entry used in this process

    def __init__(
        self, model: nn.Module, names: tuple[str, ...], features: Features, cache_dir: str, budget_mb: float
    ) -> None:
        super().__init__(model, names)
        self.features, self.directory, self.budget_mb = features, Path(cache_dir).expanduser(), budget_mb
        self.live = False

    def key(self, needs: Needs, autocast: torch.autocast) -> str:
        parts = {
            "teacher": weights_digest(self.model),
            "rows": tensors_digest(self.features.inputs),
            "outputs": [list(self.names), needs.hidden_states, needs.attentions],
            "precision": str(autocast.fast_dtype) if autocast._enabled else "fp32",
            "version": __version__,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def prepare(self, needs: Needs, autocast: torch.autocast, device: torch.device) -> None:
        """Load or compute the outputs `needs` asks for; beyond the memory budget, compute them live."""
        super().prepare(needs, autocast, device)
        size_mb = stored_bytes(self.model, self.names, self.features, needs) / 2**20
        if size_mb > self.budget_mb:
            log.info(
                "teacher outputs would take %.0f MB > teacher.outputs_cache_mb=%.0f: computed at every step",
                size_mb,
                self.budget_mb,
            )
            self.live = True
            return
        key = self.key(needs, autocast)
        if key not in self._memory:
            self._memory.clear()
            self._memory[key] = self._load_or_compute(
                self.directory / "outputs" / key, needs, autocast, device
            )
        self.stored = self._memory[key]

    def _load_or_compute(
        self, entry: Path, needs: Needs, autocast: torch.autocast, device: torch.device
    ) -> dict[str, torch.Tensor]:
        with exclusive(entry.with_suffix(".lock")):  # workers of one study compute it once
            if entry.exists():
                recorded = json.loads((entry / "checksums.json").read_text())
                if all(sha256_file(entry / name) == sha for name, sha in recorded.items()):
                    log.info("teacher outputs read from %s", entry)
                    return load_file(str(entry / "outputs.safetensors"))
                log.warning("teacher outputs at %s do not match their checksums: recomputing them", entry)
                shutil.rmtree(entry)
            stored = self._compute(needs, autocast, device)
            self._save(entry, stored)
            return stored

    @torch.no_grad()
    def _compute(
        self, needs: Needs, autocast: torch.autocast, device: torch.device
    ) -> dict[str, torch.Tensor]:
        chunks: dict[str, list[torch.Tensor]] = {}
        batches = self.features.batches(32)
        for inputs, _ in tqdm(
            batches, total=-(-len(self.features) // 32), desc="teacher outputs", unit="batch"
        ):
            with autocast:
                outputs = model_outputs(
                    self.model, {k: v.to(device) for k, v in inputs.items()}, self.names, needs
                )
            for name, value in _flatten(outputs).items():
                chunks.setdefault(name, []).append(
                    value.to("cpu", torch.float32 if name in self.names else torch.bfloat16)
                )
        return {name: torch.cat(parts) for name, parts in chunks.items()}

    def _save(self, entry: Path, stored: dict[str, torch.Tensor]) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            save_file(stored, str(staging / "outputs.safetensors"))
            checksums = {"outputs.safetensors": sha256_file(staging / "outputs.safetensors")}
            (staging / "checksums.json").write_text(json.dumps(checksums))
            staging.rename(entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def __call__(self, rows: torch.Tensor, inputs: dict[str, torch.Tensor], needs: Needs) -> ModelOutputs:
        if self.live:
            return super().__call__(rows, inputs, needs)
        device, length = inputs["input_ids"].device, inputs["input_ids"].shape[1]
        full = self.features.inputs["input_ids"].shape[1]
        take = {
            name: _cut(name, tensor[rows], full, length).to(device) for name, tensor in self.stored.items()
        }
        return _unflatten(take, self.names, needs)


def _cut(name: str, stored: torch.Tensor, full: int, length: int) -> torch.Tensor:
    """Outputs stored for full-length rows, for a batch whose padding was trimmed to `length`: padding
    never changes what real tokens see, so their first `length` positions are the same."""
    if name.startswith("attentions."):
        return stored[:, :, :length, :length]
    if stored.dim() >= 2 and stored.shape[1] == full:  # a token axis: hidden states, position logits
        return stored[:, :length]
    return stored  # class logits


def _flatten(outputs: ModelOutputs) -> dict[str, torch.Tensor]:
    flat = dict(outputs.logits)
    for i, states in enumerate(outputs.hidden_states or ()):
        flat[f"hidden_states.{i}"] = states
    for i, maps in enumerate(outputs.attentions or ()):
        flat[f"attentions.{i}"] = maps
    return flat


def _unflatten(flat: dict[str, torch.Tensor], names: tuple[str, ...], needs: Needs) -> ModelOutputs:
    def series(prefix: str) -> tuple[torch.Tensor, ...]:
        return tuple(flat[f"{prefix}.{i}"] for i in range(sum(k.startswith(f"{prefix}.") for k in flat)))

    return ModelOutputs(
        logits={name: flat[name] for name in names},
        hidden_states=series("hidden_states") if needs.hidden_states else None,
        attentions=series("attentions") if needs.attentions else None,
    )
