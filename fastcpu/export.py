"""Export a trained student as a runtime artifact (see `fastcpu_runtime.artifact` for the format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from fastcpu_runtime import write_artifact

from . import __version__
from .quantization import calibration_samples, export_state_dict
from .tasks.base import Features, Task


def export_artifact(
    directory: Path,
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    quantization: Any,
    pruning: dict,
    calibration_features: Features,
    max_seq_length: int,
    quantization_record: dict | None = None,
) -> Path:
    """Write the artifact; `pruning` and `quantization_record` are what the pruner's and the scheme's
    `finalize` reported."""
    state_dict, quantization_entry = export_state_dict(quantization, model)
    quantization_entry |= quantization_record or {}
    n_calibration = calibration_samples(quantization)
    calibration = calibration_features.subset(n_calibration).inputs if n_calibration else None
    manifest = {
        "fastcpu_version": __version__,
        "model_type": model.config.model_type,
        "task": {
            "name": task.name,
            "head": task.head,
            "input_names": list(tokenizer.model_input_names),
            "output_names": list(task.output_names),
            "max_seq_length": max_seq_length,
            "pad_token_id": tokenizer.pad_token_id or 0,
            **task.deploy_settings(),
        },
        "quantization": quantization_entry,
        "sparsity": pruning,
    }
    return write_artifact(
        directory,
        manifest=manifest,
        model_config=model.config.to_dict(),
        state_dict=state_dict,
        tokenizer=tokenizer,
        calibration=calibration,
    )
