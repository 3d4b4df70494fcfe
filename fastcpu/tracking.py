"""The `tracking` config group: one MLflow run per trial.

The default store is a sqlite database at `mlruns/mlflow.db` with artifacts under `mlruns/artifacts`
(MLflow >= 3.13 refuses a plain file store). Look at it with
`mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db`.
"""

from __future__ import annotations

import contextlib
import json
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow

from .config import ConfigError, store_base
from .serving import log_model
from .tasks.base import Task

DEFAULT_STORE = Path("mlruns")
LOG_MODELS = ("best", "all", "none")


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = (
        None  # MLflow tracking URI; null: sqlite:///mlruns/mlflow.db under the working directory
    )
    experiment: str = "fastcpu"  # MLflow experiment the runs go to
    run_name: str | None = None  # null: MLflow picks one
    # the artifact as an MLflow model that serves requests: best (the study's pick, or a lone trial),
    # all (every complete trial; each costs its size in the artifact store), none
    log_models: str = "best"
    # Model Registry name the study's pick is registered under (a new version per study); null: none
    registered_model: str | None = "fastcpu-${name}"

    def validate(self, key: str) -> None:
        if self.log_models not in LOG_MODELS:
            raise ConfigError(f"{key}.log_models={self.log_models!r} is not one of {', '.join(LOG_MODELS)}")
        if self.registered_model == "":
            raise ConfigError(f"{key}.registered_model is an empty string; use null to register nothing")


store_base("tracking", TrackingConfig())


def tracking_uri(config: TrackingConfig) -> str:
    if config.uri:
        return config.uri
    return f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


def _experiment_id(config: TrackingConfig) -> str:
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None if config.uri else (DEFAULT_STORE / "artifacts").resolve().as_uri()
    return mlflow.create_experiment(config.experiment, artifact_location=location)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


class Tracker:
    """Logs into the active MLflow run; every method is a no-op when tracking is disabled."""

    def __init__(self, run: Any | None) -> None:
        self.run = run
        self.run_id = run.info.run_id if run else None

    def metrics(self, values: Mapping[str, float]) -> None:
        if self.run:
            mlflow.log_metrics({k: float(v) for k, v in values.items()})

    def file(self, path: Path, folder: str | None = None) -> None:
        if self.run:
            mlflow.log_artifact(str(path), artifact_path=folder)

    def text(self, text: str, name: str) -> None:
        if self.run:
            mlflow.log_text(text, name)

    def model(self, artifact_dir: Path, task: Task, result: dict[str, Any]) -> str | None:
        """Log the artifact as an MLflow model (`serving.log_model`); its URI, or None untracked."""
        return log_model(artifact_dir, task, result) if self.run else None


@contextlib.contextmanager
def trial_run(
    config: TrackingConfig,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    parent_run_id: str | None = None,
) -> Iterator[Tracker]:
    """An MLflow run for one trial (a child of `parent_run_id` in a study); when the trial raises it
    ends FAILED, with the error as a tag and the traceback as `error.txt`."""
    if not config.enabled:
        yield Tracker(None)
        return
    mlflow.set_tracking_uri(tracking_uri(config))
    with mlflow.start_run(
        experiment_id=_experiment_id(config),
        run_name=config.run_name,
        tags=dict(tags),
        parent_run_id=parent_run_id,
    ) as run:
        mlflow.log_params({k: json.dumps(v) if isinstance(v, list) else v for k, v in params.items()})
        try:
            yield Tracker(run)
        except BaseException as error:
            mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:5000])
            mlflow.log_text(traceback.format_exc(), "error.txt")
            raise


def create_parent_run(config: TrackingConfig, study_name: str, params: Mapping[str, Any]) -> str:
    """The MLflow run a study's trials nest under; it stays RUNNING until a worker finishes it."""
    mlflow.set_tracking_uri(tracking_uri(config))
    client = mlflow.MlflowClient()
    tags = {"fastcpu.study": study_name, "fastcpu.role": "study"}
    run = client.create_run(_experiment_id(config), run_name=f"study {study_name}", tags=tags)
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def finish_parent_run(
    config: TrackingConfig,
    run_id: str | None,
    status: str,
    files: Iterable[Path] = (),
    metrics: Mapping[str, float] | None = None,
) -> None:
    """Log the study's result files and figures to its parent run and set its status (RUNNING leaves
    it open for the workers still running trials)."""
    if run_id is None:
        return
    mlflow.set_tracking_uri(tracking_uri(config))
    client = mlflow.MlflowClient()
    for path in files:
        client.log_artifact(run_id, str(path))
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, value)
    if status != "RUNNING":
        client.set_terminated(run_id, status)
