"""A trial's artifact as an MLflow model that answers requests, and the study's pick in the Model Registry.

The model is a pyfunc around `fastcpu_runtime`'s pipeline, with the artifact's files inside it: a table
of requests in (`question` and `context` for question answering, `text` for classification), one row out
per request (the answer or label, its score). It runs on the backend, batch shape and threads its trial
was measured with, so its answers are the trial's. fastcpu is not on a package index: serve it from an
environment that has fastcpu installed, `mlflow models serve -m models:/NAME/latest --env-manager local`.
"""

from __future__ import annotations

import dataclasses
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from fastcpu_runtime import load_artifact, load_pipeline
from fastcpu_runtime.pipeline import Pipeline, pipeline_class

from .config import ConfigError
from .tasks.base import Task

log = logging.getLogger(__name__)

TASK_TAG = "fastcpu.task"  # on every registered version: one registered name serves one task
ARTIFACT = "artifact"  # the key of the artifact directory among the model's files
MODEL_NAME = "model"  # the model's name in its run
_COLUMN_TYPES = {"str": "string", "float": "double", "int": "long"}  # result dataclass field -> MLflow type
# What the pipeline imports; fastcpu itself comes from the serving environment (`--env-manager local`).
_REQUIREMENTS = ("torch", "torchao", "transformers", "tokenizers", "safetensors", "numpy", "pandas", "mlflow")


class ArtifactModel(mlflow.pyfunc.PythonModel):
    """Serves a fastcpu artifact through `fastcpu_runtime.load_pipeline`."""

    def load_context(self, context: Any) -> None:
        runtime = context.model_config
        self._pipeline = load_pipeline(
            context.artifacts[ARTIFACT],
            runtime["backend"],
            batch_size=runtime["batch_size"],
            threads=runtime["threads"],
        )

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        rows = self._pipeline.predict(model_input.to_dict(orient="records"))
        return pd.DataFrame(rows, columns=[field.name for field in dataclasses.fields(self._pipeline.result)])


def signature(kind: type[Pipeline]) -> ModelSignature:
    """Request columns in, the pipeline's result fields out."""
    outputs = [
        ColSpec(_COLUMN_TYPES[str(field.type)], field.name) for field in dataclasses.fields(kind.result)
    ]
    return ModelSignature(Schema([ColSpec("string", name) for name in kind.columns]), Schema(outputs))


def request_example(task: Task, kind: type[Pipeline]) -> dict[str, str]:
    """The first evaluation example as a request (its question and context, or its text)."""
    example = task.examples("eval")[0]
    return {name: getattr(example, name) for name in kind.columns}


def _requirements() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in _REQUIREMENTS]


def log_model(artifact_dir: Path, task: Task, result: dict[str, Any]) -> str:
    """Log the artifact as an MLflow model into the active run; returns its URI. MLflow loads it and
    answers the example request once here (and warns, with the error, if it cannot)."""
    kind = pipeline_class(load_artifact(artifact_dir))
    runtime = {"backend": result["backend"], "batch_size": result["batch_size"], "threads": result["threads"]}
    info = mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=ArtifactModel(),
        artifacts={ARTIFACT: str(artifact_dir)},
        signature=signature(kind),
        input_example=pd.DataFrame([request_example(task, kind)]),
        model_config=runtime,
        pip_requirements=_requirements(),
    )
    return info.model_uri


def log_model_into_run(run_id: str, artifact_dir: Path, task: Task, result: dict[str, Any]) -> str:
    """`log_model` into a run that has ended (the study's pick, known only once every trial is done)."""
    with mlflow.start_run(run_id=run_id):
        return log_model(artifact_dir, task, result)


def check_registered_name(name: str, task: str) -> None:
    """Refuse a registered model name whose versions answer another task (a client of `fastcpu-squad`
    must not start getting labels), before the study does any work."""
    versions = mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
    others = sorted({version.tags.get(TASK_TAG) for version in versions} - {task, None})
    if others:
        raise ConfigError(
            f"tracking.registered_model={name!r} already holds models of task {', '.join(others)}, and this "
            f"study's task is {task}; choose another name"
        )


def register(model_uri: str, name: str, task: str, metrics: dict[str, float], trial: int) -> str:
    """A new version of registered model `name`, tagged with the task and the trial's number and metrics."""
    version = mlflow.register_model(model_uri, name)
    client = mlflow.MlflowClient()
    for key, value in {TASK_TAG: task, "fastcpu.trial": trial, **metrics}.items():
        client.set_model_version_tag(name, version.version, key, str(value))
    serve = f"mlflow models serve -m models:/{name}/{version.version} --env-manager local"
    log.info("registered trial %d as %s version %s; serve it: %s", trial, name, version.version, serve)
    return version.version
