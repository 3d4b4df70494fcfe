"""The `teacher` config group: load the user's model, fine-tune it for the task when it has no head
for it yet, and cache the tuned teacher (with its score) on disk so later trials reuse it.

The cache key hashes everything that determines the tuned weights: the source weights, the task's
data and preprocessing, the fine-tuning settings, the seed and fastcpu's version.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from fastcpu_runtime.modeling import supported_attention

from . import __version__
from .config import ConfigError, check_range, store_base
from .evaluation import evaluate, module_runner
from .tasks.base import Task
from .training import Checkpoint, TrainingConfig, seed_everything, train

log = logging.getLogger(__name__)


class TeacherError(RuntimeError):
    """The teacher model cannot be found or loaded."""


def default_cache_dir() -> str:
    """$FASTCPU_CACHE, else ~/.cache/fastcpu."""
    return os.environ.get("FASTCPU_CACHE", "~/.cache/fastcpu")


@dataclass
class TeacherConfig:
    model: str  # local directory or hub id of the (fine-tuned or base) model
    finetune: Literal["auto", "always", "never"] = (
        "auto"  # auto: only when the model has no head for the task
    )
    # budget of that fine-tuning; with the model's own dropout, as fine-tuning on labels alone needs it
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(dropout=None))
    cache_dir: str = field(default_factory=default_cache_dir)  # tuned teachers, scores, outputs; by hash
    eval_batch_size: int = 32
    outputs_cache_mb: float = 2048  # teacher outputs on the training rows kept for every trial; 0: live
    checkpoint_minutes: float = 5.0  # fine-tuning saves its state this often, resumed after a kill; 0: never

    def validate(self, key: str) -> None:
        check_range(f"{key}.eval_batch_size", self.eval_batch_size, 1)
        check_range(f"{key}.outputs_cache_mb", self.outputs_cache_mb, 0.0)
        check_range(f"{key}.checkpoint_minutes", self.checkpoint_minutes, 0.0)


store_base("teacher", TeacherConfig(model="???"))  # ???: each option file must name its model


@dataclass
class Teacher:
    model: nn.Module
    tokenizer: Any
    metrics: dict[str, float]  # the teacher's score on the task's evaluation set
    path: str  # where its weights live (the cache entry when fine-tuned here)
    finetuned: bool


def resolve_source(name: str) -> str:
    """A local directory as an absolute path; anything else must look like a hub id."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TeacherError(
                f"teacher.model={name!r} is a file; give the model's directory (config.json + weights)"
            )
        return str(path.resolve())
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path:
        raise TeacherError(f"teacher.model={name!r}: no such directory")
    return name


def load_model_config(source: str) -> PretrainedConfig:
    """The model's config, or one clear error when neither disk nor hub can give it."""
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as error:
        raise TeacherError(
            f"teacher.model={source!r} is neither a local model directory nor a model id the hub served "
            f"(offline? set teacher.model to a local directory): {error}"
        ) from error


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def weights_digest(model: nn.Module) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: identifies the source weights."""
    return tensors_digest(model.state_dict())


def model_fingerprint(model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """What decides a tuned teacher besides its weights: the architecture (two families can share
    identical weights) and the tokenization (the same text gives other features)."""
    volatile = ("_name_or_path", "transformers_version")
    config = {key: value for key, value in model.config.to_dict().items() if key not in volatile}
    tokenization = json.dumps([tokenizer.backend_tokenizer.to_str(), list(tokenizer.model_input_names)])
    return {"config": _digest(config), "tokenizer": hashlib.sha256(tokenization.encode()).hexdigest()}


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load(task: Task, source: str) -> tuple[nn.Module, Any]:
    auto_class = task.auto_model_class()
    model_class = auto_class._model_mapping[type(load_model_config(source))]
    attention = supported_attention(model_class, "sdpa")
    model = auto_class.from_pretrained(source, attn_implementation=attention, **task.model_kwargs())
    return model.eval(), AutoTokenizer.from_pretrained(source)


def _save_atomically(entry: Path, model: nn.Module, tokenizer: Any, metrics: dict) -> None:
    """Write the cache entry into a temporary sibling and rename it: no half-written teacher."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "teacher_metrics.json").write_text(json.dumps(metrics, indent=2))
        staging.rename(entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def prepare_teacher(config: TeacherConfig, task: Task, seed: int) -> Teacher:
    """The tuned teacher for `task` with its evaluation score, from the cache when possible."""
    source = resolve_source(config.model)
    model_config = load_model_config(source)
    tuned = task.is_tuned(model_config)
    if config.finetune == "never" and not tuned:
        raise ConfigError(
            f"teacher.finetune=never, but {config.model!r} has no {task.head} head for task {task.name!r}; "
            "use teacher.finetune=auto to fine-tune it first"
        )
    finetune = config.finetune == "always" or (config.finetune == "auto" and not tuned)
    seed_everything(seed)  # a freshly initialised task head must hash (and train) the same every time
    model, tokenizer = _load(task, source)
    key_parts = {
        "weights": weights_digest(model),
        **model_fingerprint(model, tokenizer),
        "task": task.fingerprint(),
        "version": __version__,
    }
    cache = Path(config.cache_dir).expanduser()
    if not finetune:
        metrics = _cached_score(
            cache / "scores" / f"{_digest(key_parts)}.json", model, tokenizer, task, config
        )
        return Teacher(model, tokenizer, metrics, source, finetuned=False)
    key_parts |= {"training": asdict(config.training), "seed": seed}
    entry = cache / "teachers" / _digest(key_parts)
    with exclusive(entry.with_suffix(".lock")):  # workers of one study wait for one fine-tuning
        if not entry.exists():
            _finetune(entry, model, tokenizer, task, config, seed)
        else:
            log.info("reusing the fine-tuned teacher cached at %s", entry)
    model, tokenizer = _load(task, str(entry))
    metrics = json.loads((entry / "teacher_metrics.json").read_text())
    return Teacher(model, tokenizer, metrics, str(entry), finetuned=True)


def _finetune(
    entry: Path, model: nn.Module, tokenizer: Any, task: Task, config: TeacherConfig, seed: int
) -> None:
    log.info("fine-tuning the teacher (cached afterwards at %s)", entry)
    train_features = task.train_features(tokenizer, list(tokenizer.model_input_names))
    checkpoint = Checkpoint(entry.with_name(f"{entry.name}.checkpoint.pt"), config.checkpoint_minutes * 60)
    train(
        model,
        task,
        train_features,
        config.training,
        seed=seed,
        description="teacher fine-tuning",
        checkpoint=checkpoint if config.checkpoint_minutes else None,
    )
    metrics = score_teacher(model, tokenizer, task, config)
    _save_atomically(entry, model, tokenizer, metrics)
    checkpoint.path.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """An OS file lock: one process at a time, released even when the holder is killed."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Teachers:
    """Teachers prepared in this process, keyed by what determines them: a study's trials share one."""

    def __init__(self) -> None:
        self._prepared: dict[str, Teacher] = {}

    def __call__(self, config: TeacherConfig, task: Task, seed: int) -> Teacher:
        key = json.dumps([asdict(config), task.fingerprint(), seed], sort_keys=True, default=str)
        if key not in self._prepared:
            self._prepared[key] = prepare_teacher(config, task, seed)
        return self._prepared[key]


def score_teacher(model: nn.Module, tokenizer: Any, task: Task, config: TeacherConfig) -> dict[str, float]:
    """The teacher's metrics on the task's evaluation set (tokenized only when a score is needed)."""
    features = task.eval_features(tokenizer, list(tokenizer.model_input_names))
    runner = module_runner(model, task.output_names)
    metrics, _ = evaluate(runner, task, features, config.eval_batch_size, "teacher evaluation")
    return metrics


def _cached_score(path: Path, model: nn.Module, tokenizer: Any, task: Task, config: TeacherConfig) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    metrics = score_teacher(model, tokenizer, task, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(metrics, indent=2))
    staging.replace(path)
    return metrics
