"""Sequence-length buckets: each call runs at the shortest compiled length that holds its tokens.

Compiled graphs have one fixed shape, and padding every request to the longest window makes a short
question pay for 384 tokens. A `BucketedSession` holds one `Session` per length (each compiled, and
under `auto` raced, at its own shape), cuts each batch after the last position any row attends to, and
runs it on the shortest bucket that fits. Token-level outputs come back at the caller's length, with
-inf at the positions it did not run (no span or tag can start on them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .artifact import Artifact, load_artifact
from .auto import AUTO
from .inputs import as_batch
from .session import Session, create_session


class BucketedSession:
    """Sessions of one artifact and batch size at several sequence lengths, used like one `Session`."""

    def __init__(self, sessions: Sequence[Session]) -> None:
        if not sessions:
            raise ValueError("a bucketed session needs at least one session")
        self.sessions = sorted(sessions, key=lambda session: session.seq_len)
        largest = self.sessions[-1]
        self.artifact, self.batch_size, self.seq_len = largest.artifact, largest.batch_size, largest.seq_len
        self.threads = largest.threads
        self.backend = "+".join(dict.fromkeys(session.backend for session in self.sessions))
        self.description = "; ".join(f"seq {s.seq_len}: {s.description}" for s in self.sessions)

    @property
    def buckets(self) -> list[int]:
        return [session.seq_len for session in self.sessions]

    def __repr__(self) -> str:
        return f"BucketedSession(buckets={self.buckets}, batch_size={self.batch_size}, {self.backend})"

    def session_for(self, length: int) -> Session:
        """The shortest bucket holding `length` tokens."""
        for session in self.sessions:
            if session.seq_len >= length:
                return session
        raise ValueError(f"a batch attends to {length} tokens, more than the largest bucket {self.seq_len}")

    def run(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """`Session.run` on the shortest bucket that holds the batch's attended tokens."""
        batch, _, s = as_batch(inputs, self.artifact.input_names)
        length = attended_length(batch)
        session = self.session_for(length)
        outputs = session.run({name: tensor[:, :length] for name, tensor in batch.items()})
        if not session.token_level:
            return outputs
        return {name: _pad_positions(tensor, s) for name, tensor in outputs.items()}


def attended_length(batch: Mapping[str, torch.Tensor]) -> int:
    """One past the last position any row attends to (the whole width without an attention mask)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return int(batch["input_ids"].shape[1])
    attended = torch.nonzero(mask.any(dim=0))
    return int(attended[-1]) + 1 if len(attended) else 1


def _pad_positions(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """[b, s, ...] outputs widened to [b, length, ...] with -inf where no position ran."""
    if tensor.ndim < 2 or tensor.shape[1] >= length:
        return tensor
    out = torch.full((tensor.shape[0], length, *tensor.shape[2:]), float("-inf"), dtype=tensor.dtype)
    out[:, : tensor.shape[1]] = tensor
    return out


def bucket_lengths(buckets: Sequence[int], max_length: int) -> list[int]:
    """Sorted distinct bucket lengths, always ending at `max_length`; a length outside 1..max_length is
    refused with the range allowed."""
    wrong = [length for length in buckets if not 1 <= length <= max_length]
    if wrong:
        raise ValueError(f"buckets {wrong} are outside 1..{max_length} (the artifact's max_seq_length)")
    return sorted({*buckets, max_length})


def create_bucketed_session(
    artifact: Artifact | str | os.PathLike[str],
    backend: str = AUTO,
    *,
    batch_size: int,
    buckets: Sequence[int],
    threads: int | None = None,
) -> BucketedSession:
    """A session per bucket length (plus the artifact's max_seq_length), each prepared as
    `create_session` prepares one."""
    if not isinstance(artifact, Artifact):
        artifact = load_artifact(artifact)
    lengths = bucket_lengths(buckets, artifact.max_seq_length)
    return BucketedSession(
        [
            create_session(artifact, backend, batch_size=batch_size, seq_len=length, threads=threads)
            for length in lengths
        ]
    )
