"""fp32 eager reference: the plain PyTorch module, the yardstick every other backend is compared with."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..modeling import PositionalModel
from .registry import Runner, register_backend

if TYPE_CHECKING:
    from ..artifact import Artifact


@register_backend("eager")
def eager(artifact: Artifact, batch_size: int, seq_len: int) -> Runner:
    """Dequantized int8 and upcast bf16 weights, run in fp32 without compilation."""
    model = PositionalModel(artifact.build_model(), artifact.input_names, artifact.output_names).eval()
    return Runner(model, f"eager fp32 (PyTorch {_torch_version()}, no compile)")


def _torch_version() -> str:
    import torch

    return torch.__version__
