"""Distillation on corrupted copies of the training batches: more inputs for the teacher to label than
the task's data holds (TinyBERT's data augmentation, without its masked-language model: the words put in
are drawn from the batch itself, so they stay in the domain's vocabulary).

Every `every`-th step trains on a copy of its batch in which each token, special tokens and padding aside,
is swapped with probability `replace` for a token drawn from the batch's other tokens. The labels no
longer hold for such a copy, so that step trains on the distillation terms alone (the teacher sees the same
copy); the other steps train as without augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import check_range


@dataclass
class AugmentationConfig:
    every: int = 0  # every n-th step distils on a corrupted copy of its batch; 0: never, 1: every step
    replace: float = 0.2  # probability that a token of the copy is swapped for one drawn from the batch

    def validate(self, key: str) -> None:
        check_range(f"{key}.every", self.every, 0)
        check_range(f"{key}.replace", self.replace, 0.0, 1.0, low_open=True)

    def due(self, step: int) -> bool:
        """Whether `step` (0-based) trains on a corrupted copy."""
        return self.every > 0 and step % self.every == self.every - 1


def special_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Padding and special tokens, as a mask. Every family fastcpu supports starts a row with its
    classification token and ends it with its separator, which also sits between question and context:
    the ids found first and last in the rows are the special ones."""
    lengths = attention_mask.sum(1).long()
    last = input_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    special = torch.cat([input_ids[:, 0], last]).unique()
    return torch.isin(input_ids, special) | (attention_mask == 0)


def corrupt(inputs: dict[str, torch.Tensor], replace: float) -> dict[str, torch.Tensor]:
    """A copy of `inputs` whose ordinary tokens are each swapped, with probability `replace`, for one
    drawn uniformly from the batch's ordinary tokens (so in proportion to how often each occurs). The
    draws come from torch's global generator, which training seeds."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    ordinary = ~special_positions(ids, mask)
    pool = ids[ordinary]
    if pool.numel() == 0:
        return inputs
    swap = ordinary & (torch.rand(ids.shape) < replace)
    drawn = pool[torch.randint(pool.numel(), (int(swap.sum()),))]
    corrupted = ids.clone()
    corrupted[swap] = drawn
    return {**inputs, "input_ids": corrupted}
