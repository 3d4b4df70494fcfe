"""fastcpu_runtime: load a fastcpu deploy artifact and run it fast on CPU.

Deploy-side only: it depends on torch, torchao, transformers, safetensors and numpy, never on the
training stack (datasets, optuna, mlflow, hydra), so it can ship alone.
"""

from .artifact import Artifact, load_artifact, write_artifact
from .auto import AUTO, pick_backend
from .backends import available_backends, backend_refusal, register_backend
from .bench import BenchmarkResult, benchmark
from .errors import ArtifactError, BackendError
from .pipeline import Answer, Label, Pipeline, load_pipeline
from .quant import dequantize_per_channel, quantize_per_channel
from .session import Session, create_session

__all__ = [
    "AUTO",
    "Answer",
    "Artifact",
    "ArtifactError",
    "BackendError",
    "BenchmarkResult",
    "Label",
    "Pipeline",
    "Session",
    "available_backends",
    "backend_refusal",
    "benchmark",
    "create_session",
    "dequantize_per_channel",
    "load_artifact",
    "load_pipeline",
    "pick_backend",
    "quantize_per_channel",
    "register_backend",
    "write_artifact",
]
