"""One trial: teacher -> distilled, pruned, quantized student -> artifact -> measured on the runtime.

`TrialConfig.from_hydra` validates the whole composed config before any work starts; `run_trial`
then goes through the steps, writing `result.json` last so a trial directory that has one is
complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import fastcpu_runtime as rt
from fastcpu_runtime.architectures import family_layer_map

from .config import ConfigError, build, to_plain
from .distillation import DistillationConfig, Distiller, build_distillation
from .export import export_artifact
from .measure import MEASURED, RuntimeConfig, measure_artifact
from .pruning import PRUNERS, make_pruner
from .quantization import SCHEMES, NoQuantization, make_quantizer
from .student import StudentConfig, make_student
from .tasks import build_task_config, make_task
from .tasks.base import Task
from .teacher import Teacher, TeacherConfig, TeacherError, load_model_config, prepare_teacher, resolve_source
from .teacher_outputs import CachedTeacher
from .tracking import TrackingConfig, flatten, trial_run
from .training import TrainingConfig, train

log = logging.getLogger(__name__)

GROUPS = (
    "task",
    "teacher",
    "student",
    "training",
    "pruning",
    "distillation",
    "quantization",
    "runtime",
    "tracking",
)


@dataclass
class TrialConfig:
    name: str
    seed: int
    task: Any
    teacher: TeacherConfig
    student: StudentConfig
    training: TrainingConfig
    pruning: Any
    distillation: DistillationConfig
    quantization: Any
    runtime: RuntimeConfig
    tracking: TrackingConfig

    @classmethod
    def from_hydra(cls, cfg: DictConfig) -> TrialConfig:
        """Validate every group; raises ConfigError naming the first bad key."""
        tree = to_plain(cfg)
        unknown = sorted(set(tree) - {*GROUPS, "name", "seed", "search", "hydra"})
        if unknown:
            raise ConfigError(
                f"unknown top-level key(s) {unknown}; allowed: name, seed, search, {', '.join(GROUPS)}"
            )
        seed = tree.get("seed", 42)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        return cls(
            name=str(tree.get("name", "default")),
            seed=seed,
            task=build_task_config(tree.get("task")),
            teacher=build(TeacherConfig, tree.get("teacher"), "teacher"),
            student=build(StudentConfig, tree.get("student"), "student"),
            training=build(TrainingConfig, tree.get("training"), "training"),
            pruning=PRUNERS.build(tree.get("pruning")),
            distillation=build_distillation(tree.get("distillation")),
            quantization=SCHEMES.build(tree.get("quantization")),
            runtime=build(RuntimeConfig, tree.get("runtime"), "runtime"),
            tracking=build(TrackingConfig, tree.get("tracking"), "tracking"),
        )


def _write_json(path: Path, data: Any) -> None:
    """Write via a temporary file and rename, so readers never see a partial file."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(data, indent=2, sort_keys=True))
    staging.replace(path)


def _headline(result: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of a result (per-layer figures become `sparsity/<layer>`)."""
    metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics |= {f"sparsity/{k}": v for k, v in result.get("sparsity_per_layer", {}).items()}
    return metrics


def result_metrics(task: Task) -> set[str]:
    """The numbers every trial's result holds: what a sweep may optimize or constrain."""
    return {*task.metric_names, *MEASURED, "relative_drop"}


def check_teacher_score(teacher: Teacher, task: Task) -> None:
    """A teacher that scores 0 teaches nothing, and a relative drop against it means nothing."""
    score = teacher.metrics[task.primary_metric]
    if score <= 0:
        raise TeacherError(
            f"the teacher ({teacher.path}) scores {task.primary_metric}={score} on the evaluation set: its "
            "head does not solve the task (fine-tuning failed, or teacher.finetune=never on an untuned "
            "model); fix the teacher before distilling from it"
        )


ROBERTA_POSITIONS = ("roberta", "xlm-roberta", "camembert")  # positions start at padding_idx + 1


def position_limit(model_config: Any) -> int | None:
    """The longest input the model's position embeddings cover; None when positions are relative only.
    RoBERTa-style models number positions from padding_idx + 1, so two of their slots are never used."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is None or getattr(model_config, "position_biased_input", True) is False:  # DeBERTa-v2/v3
        return None
    offset = model_config.pad_token_id + 1 if model_config.model_type in ROBERTA_POSITIONS else 0
    return limit - offset


def check_against_teacher(config: TrialConfig, model_config: Any) -> None:
    """What the teacher's config alone can refute, before any weights load or training starts."""
    try:
        family_layer_map(model_config.model_type)
    except ValueError as error:
        raise ConfigError(f"teacher {config.teacher.model}: {error}") from None
    config.student.check_against(model_config)
    refusal = rt.backend_refusal(config.runtime.backend, model_config.model_type, config.quantization.scheme)
    if refusal:
        raise ConfigError(f"runtime.backend={config.runtime.backend}: {refusal}")
    limit = position_limit(model_config)
    if limit is not None and config.task.max_seq_length > limit:
        raise ConfigError(
            f"task.max_seq_length={config.task.max_seq_length} exceeds what the teacher "
            f"({config.teacher.model}, {model_config.model_type}) can read: at most {limit} tokens"
        )


def run_trial(
    cfg: DictConfig,
    output_dir: Path,
    *,
    teachers: Callable[[TeacherConfig, Task, int], Teacher] = prepare_teacher,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one trial end to end; returns the result written to `output_dir/result.json`.

    A study passes `teachers` (prepared once, shared by its trials), its MLflow parent run and tags.
    """
    config = TrialConfig.from_hydra(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    resolved.pop("search", None)
    params = flatten(resolved)
    tags = {
        "fastcpu.experiment": config.name,
        "fastcpu.output_dir": str(output_dir.resolve()),
        **(tags or {}),
    }
    with trial_run(config.tracking, params, tags, parent_run_id) as tracker:
        tracker.text(OmegaConf.to_yaml(OmegaConf.create(resolved)), "config.yaml")
        check_against_teacher(config, load_model_config(resolve_source(config.teacher.model)))
        task = make_task(config.task)
        teacher = teachers(config.teacher, task, config.seed)
        log.info("teacher %s: %s", teacher.path, teacher.metrics)
        check_teacher_score(teacher, task)
        tracker.metrics({f"teacher_{k}": v for k, v in teacher.metrics.items()})

        input_names = list(teacher.tokenizer.model_input_names)
        train_features = task.train_features(teacher.tokenizer, input_names)
        eval_features = task.eval_features(teacher.tokenizer, input_names)
        student = make_student(teacher.model, config.student)
        total_steps = config.training.total_steps(len(train_features))
        methods = [
            make_pruner(config.pruning, total_steps),
            make_quantizer(config.quantization, total_steps),
            Distiller(config.distillation, teacher.model.config),
        ]
        started = time.perf_counter()
        trained = train(
            student,
            task,
            train_features,
            config.training,
            seed=config.seed,
            methods=methods,
            teacher=CachedTeacher(
                teacher.model,
                task.output_names,
                train_features,
                config.teacher.cache_dir,
                config.teacher.outputs_cache_mb,
            ),
            description="student training",
        )
        summary = trained.summary | {"seconds": time.perf_counter() - started}
        pruning, quantization_record, _ = trained.records

        artifact_dir = output_dir / "artifact"
        export_artifact(
            artifact_dir,
            student,
            teacher.tokenizer,
            task,
            config.quantization,
            pruning,
            train_features,
            config.task.max_seq_length,
            quantization_record,
        )
        result, predictions = measure_artifact(artifact_dir, task, eval_features, config.runtime)
        metric = task.primary_metric
        teacher_score = teacher.metrics[metric]
        result |= {f"teacher_{k}": v for k, v in teacher.metrics.items()}
        result["relative_drop"] = (teacher_score - result[metric]) / teacher_score
        result |= {f"train_{k}": v for k, v in summary.items()}
        result["artifact"] = str(artifact_dir.resolve())
        result["mlflow_run_id"] = tracker.run_id
        logs_model = config.tracking.log_models == "all" or (
            config.tracking.log_models == "best" and parent_run_id is None  # a lone trial is its own pick
        )
        result["mlflow_model_uri"] = tracker.model(artifact_dir, task, result) if logs_model else None

        _write_json(output_dir / "predictions.json", predictions)
        tracker.metrics(_headline(result))
        tracker.file(output_dir / "predictions.json")
        tracker.file(artifact_dir / "manifest.json", "artifact")
        _write_json(output_dir / "result.json", result)
        tracker.file(output_dir / "result.json")
    log.info(
        "%s=%.2f (teacher %.2f), %.1f samples/s, p90 %.1f ms, sparsity %.2f -> %s",
        metric,
        result[metric],
        teacher_score,
        result["throughput"],
        result["latency_p90_ms"],
        result["sparsity"],
        output_dir,
    )
    return result


def measure_uncompressed(
    cfg: DictConfig,
    output_dir: Path,
    backends: dict[str, str],
    teachers: Callable[[TeacherConfig, Task, int], Teacher] = prepare_teacher,
) -> dict[str, dict[str, Any]]:
    """The teacher exported without any compression and measured on each of `backends` ({label:
    backend}): the reference points a study's trials are compared with."""
    config = TrialConfig.from_hydra(cfg)
    task = make_task(config.task)
    teacher = teachers(config.teacher, task, config.seed)
    eval_features = task.eval_features(teacher.tokenizer, list(teacher.tokenizer.model_input_names))
    artifact_dir = output_dir / "artifact"
    export_artifact(
        artifact_dir,
        teacher.model,
        teacher.tokenizer,
        task,
        NoQuantization(),
        {"method": "none"},
        eval_features,
        config.task.max_seq_length,
    )
    references = {}
    for label, backend in backends.items():
        runtime = dataclasses.replace(config.runtime, backend=backend)
        result, _ = measure_artifact(artifact_dir, task, eval_features, runtime)
        keep = {*task.metric_names, *MEASURED, "backend_description"}
        references[label] = {k: v for k, v in result.items() if k in keep}
        log.info("reference %s on %s: %s", label, backend, references[label])
    return references
