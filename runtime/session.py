"""A Session is one backend prepared for one fixed (batch_size, seq_len) shape."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from .artifact import Artifact, load_artifact
from .auto import AUTO, describe_auto, pick_backend
from .backends import Runner, build_runner
from .inputs import as_batch, pad_batch, synthetic_batch

_TOKEN_LEVEL_HEADS = ("question_answering", "token_classification")


class Session:
    """Runs an artifact on one backend; pads inputs to the fixed shape and slices outputs back."""

    def __init__(
        self, artifact: Artifact, backend: str, runner: Runner, batch_size: int, seq_len: int
    ) -> None:
        self.artifact = artifact
        self.backend = backend
        self.description = runner.description
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.threads = torch.get_num_threads()
        self._fn = runner.fn

    def __repr__(self) -> str:
        return f"Session({self.description!r}, batch_size={self.batch_size}, seq_len={self.seq_len})"

    @property
    def token_level(self) -> bool:
        """Whether outputs have a sequence dimension (a value per token) that padding must not leak into."""
        return self.artifact.head in _TOKEN_LEVEL_HEADS

    def run(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Run up to [batch_size, seq_len] inputs; returns float32 outputs for exactly the given rows."""
        batch, b, s = as_batch(inputs, self.artifact.input_names)
        padded = pad_batch(batch, self.batch_size, self.seq_len, self.artifact.pad_token_id)
        with torch.inference_mode():
            raw = self._fn(*(padded[name] for name in self.artifact.input_names))
        return self._unpad(self._named(raw), b, s)

    def _named(self, raw: Any) -> dict[str, torch.Tensor]:
        names = self.artifact.output_names
        if isinstance(raw, Mapping):
            return {name: raw[name] for name in names}
        if isinstance(raw, torch.Tensor):
            raw = (raw,)
        if len(raw) != len(names):
            raise RuntimeError(f"backend {self.backend} returned {len(raw)} outputs, expected {names}")
        return dict(zip(names, raw, strict=True))

    def _unpad(self, outputs: dict[str, torch.Tensor], b: int, s: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, tensor in outputs.items():
            tensor = tensor[:b, :s] if self.token_level and tensor.ndim >= 2 else tensor[:b]
            out[name] = tensor.float().clone()  # clone: do not hand out views of reused compiled buffers
        return out


def create_session(
    artifact: Artifact | str | os.PathLike[str],
    backend: str = AUTO,
    *,
    batch_size: int,
    seq_len: int,
    threads: int | None = None,
) -> Session:
    """Prepare `backend` for the artifact at a fixed shape; compilation and the first call happen here.

    `auto` races the candidate backends at this shape (`pick_backend`); the session then carries the
    winner's name, and its description says that auto chose it and why."""
    if not isinstance(artifact, Artifact):
        artifact = load_artifact(artifact)
    _check_shape(artifact, batch_size, seq_len)
    if threads is not None:
        torch.set_num_threads(threads)
    if backend == AUTO:
        backend, runner, reason = pick_backend(artifact, batch_size, seq_len)
        runner = Runner(runner.fn, describe_auto(backend, reason, runner.description))
    else:
        runner = build_runner(backend, artifact, batch_size, seq_len)
    session = Session(artifact, backend, runner, batch_size, seq_len)
    session.run(synthetic_batch(artifact.input_names, batch_size, seq_len, artifact.vocab_size))
    return session


def _check_shape(artifact: Artifact, batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    limit = artifact.model_config.get("max_position_embeddings")
    if limit is not None and seq_len > int(limit):
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {limit}")
