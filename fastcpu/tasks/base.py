"""What every task shares: the config base, tokenized `Features`, data-loading helpers and `Task`.

A task owns its data end to end (load, tokenize, score, loss) so the trainers and the compressors only
ever see tensors, output names and a metric dict.
"""

import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastcpu.config import ConfigError, Registry, check_range


class DataError(ValueError):
    """A data file or dataset is unusable. The message names the file and what is wrong."""


TASKS: Registry = Registry("task")

# Our split names mapped to the split names of `datasets` benchmarks.
HF_SPLITS = {"train": "train", "eval": "validation"}
# Settings that say where the data lives, not what it is: the fingerprint hashes the contents instead.
SOURCE_KEYS = ("train_file", "eval_file", "dataset", "dataset_config")


@dataclass
class DataConfig:
    """Settings every task has; each task's config extends it."""

    name: str = ""
    train_file: str | None = None
    eval_file: str | None = None
    dataset: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_seq_length: int = 128

    def validate(self, key: str) -> None:
        if self.train_file is None and self.eval_file is None and self.dataset is None:
            raise ConfigError(
                f"{key}: no data source; set {key}.train_file and/or {key}.eval_file (local files) "
                f"or {key}.dataset (a `datasets` name)"
            )
        for field in ("train_file", "eval_file", "dataset"):
            if getattr(self, field) == "":
                raise ConfigError(f"{key}.{field} is an empty string; use null to leave it unset")
        check_range(f"{key}.max_train_samples", self.max_train_samples, 1)
        check_range(f"{key}.max_eval_samples", self.max_eval_samples, 1)
        check_range(f"{key}.max_seq_length", self.max_seq_length, 16)


@dataclass
class Features:
    """Tokenized model inputs for a set of examples, padded to max_seq_length."""

    inputs: dict[str, Tensor]
    labels: dict[str, Tensor]
    meta: Any = None

    def __post_init__(self) -> None:
        rows = {name: len(t) for name, t in {**self.inputs, **self.labels}.items()}
        if len(set(rows.values())) > 1:
            raise ValueError(f"features disagree on the number of rows: {rows}")

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def indexed_batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        by_length: bool = False,
    ) -> Iterator[tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]]:
        """Yield (row indices, inputs, labels) batches; the last one may be short. `by_length` (with
        `shuffle`) puts rows of similar length in one batch, so less of each batch is padding."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        if not shuffle:
            order = torch.arange(n)
        elif by_length:
            order = self._length_grouped_order(batch_size, generator)
        else:
            order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            taken = rows if shuffle else slice(start, start + batch_size)  # a slice takes views, not copies
            yield rows, _take(self.inputs, taken), _take(self.labels, taken)

    def _length_grouped_order(self, batch_size: int, generator: torch.Generator | None) -> Tensor:
        """A random order in which each run of `batch_size` rows has similar lengths: shuffle, sort each
        window of 50 batches by length, then shuffle the batches (the rule of Hugging Face's
        group_by_length)."""
        lengths = self.inputs["attention_mask"].sum(1)
        order = torch.randperm(len(self), generator=generator)
        window = 50 * batch_size
        chunks = [order[i : i + window] for i in range(0, len(order), window)]
        grouped = torch.cat([c[torch.argsort(lengths[c], descending=True, stable=True)] for c in chunks])
        batches = list(grouped.split(batch_size))
        shuffled = torch.randperm(len(batches), generator=generator)
        return torch.cat([batches[i] for i in shuffled])

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor]]]:
        """Yield (inputs, labels) batches; the last one may be short."""
        for _, inputs, labels in self.indexed_batches(batch_size, shuffle, generator):
            yield inputs, labels

    def subset(self, n: int) -> "Features":
        """The first n rows, for calibration sets. Meta follows when it knows how to (`meta.subset`)."""
        meta = self.meta.subset(n) if hasattr(self.meta, "subset") else self.meta
        return Features(_take(self.inputs, slice(0, n)), _take(self.labels, slice(0, n)), meta)


def _take(tensors: dict[str, Tensor], rows: slice | Tensor) -> dict[str, Tensor]:
    return {name: t[rows] for name, t in tensors.items()}


def same_file(first: str | None, second: str | None) -> bool:
    """Whether two configured paths name one file (relative, `~` and symlinked spellings included)."""
    if first is None or second is None:
        return False
    a, b = Path(first).expanduser(), Path(second).expanduser()
    return a.samefile(b) if a.exists() and b.exists() else a.resolve() == b.resolve()


def read_text(path: str) -> str:
    """Read a UTF-8 text file, turning the usual failures into one DataError naming the file."""
    file = Path(path)
    if not file.exists():
        raise DataError(f"{path}: file not found")
    if not file.is_file():
        raise DataError(f"{path}: not a regular file")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from error
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def load_hf_split(name: str, config_name: str | None, split: str) -> Any:
    """Load one split with `datasets`; any failure (usually offline) becomes a DataError saying what to do."""
    import datasets  # slow import, only needed on this path

    try:
        return datasets.load_dataset(name, config_name, split=split)
    except Exception as error:  # datasets raises many unrelated types for "not reachable / not found"
        label = name if config_name is None else f"{name}/{config_name}"
        raise DataError(
            f"dataset {label!r} (split {split!r}) could not be loaded: {type(error).__name__}: {error}. "
            "Without network access, set task.train_file / task.eval_file to local files instead."
        ) from error


def require_columns(columns: Sequence[str], needed: Sequence[str], where: str, hint: str = "") -> None:
    """Raise a DataError listing the missing columns and the ones that exist."""
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; it has {list(columns)}{hint}")


def check_outputs(outputs: dict[str, np.ndarray], names: Sequence[str], rows: int) -> dict[str, np.ndarray]:
    """The named outputs as float arrays with one row per feature, or a ValueError saying what is off."""
    missing = [name for name in names if name not in outputs]
    if missing:
        raise ValueError(f"model outputs lack {missing}; got {sorted(outputs)}")
    arrays = {name: np.asarray(outputs[name], dtype=np.float32) for name in names}
    wrong = {name: a.shape for name, a in arrays.items() if len(a) != rows}
    if wrong:
        raise ValueError(f"model outputs have {wrong} rows but there are {rows} features")
    return arrays


def position_cross_entropy(logits: Tensor, positions: Tensor) -> Tensor:
    """Cross-entropy over sequence positions the way HF QA heads do it: out-of-range targets are ignored."""
    ignored = logits.size(1)
    return F.cross_entropy(logits, positions.long().clamp(0, ignored), ignore_index=ignored)


def first_n(items: list, n: int | None) -> list:
    return items if n is None else items[:n]


class Task(ABC):
    """One benchmark: where its data comes from, how it is tokenized, scored and trained against."""

    name: ClassVar[str]
    head: ClassVar[str]
    output_names: ClassVar[tuple[str, ...]]
    primary_metric: ClassVar[str]
    metric_names: ClassVar[tuple[str, ...]]  # every score `evaluate` returns
    auto_class_name: ClassVar[str]  # transformers AutoModelFor... class
    architecture_suffix: ClassVar[str]  # the ...For<Head> suffix of architectures tuned for this task

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self._examples: dict[str, list] = {}

    # -- model ---------------------------------------------------------------------------------------
    def auto_model_class(self) -> type:
        import transformers

        return getattr(transformers, self.auto_class_name)

    def model_kwargs(self) -> dict:
        return {}

    def is_tuned(self, model_config: Any) -> bool:
        """Whether a checkpoint already carries a trained head for this task (so it can be a teacher)."""
        architectures = getattr(model_config, "architectures", None) or []
        has_head = any(arch.endswith(self.architecture_suffix) for arch in architectures)
        return has_head and self._labels_match(model_config)

    def _labels_match(self, model_config: Any) -> bool:
        return True

    # -- data ----------------------------------------------------------------------------------------
    def examples(self, split: str) -> list:
        """The examples of split "train" or "eval", capped by max_*_samples; loaded on first use."""
        if split not in self._examples:
            cap = self.config.max_train_samples if split == "train" else self.config.max_eval_samples
            self._examples[split] = first_n(self._load(split), cap)
        return self._examples[split]

    def source_file(self, split: str) -> str | None:
        """The local file a split is read from, if any."""
        return self.config.train_file if split == "train" else self.config.eval_file

    def has_source(self, split: str) -> bool:
        return self.source_file(split) is not None or self.config.dataset is not None

    def _load(self, split: str) -> list:
        file = self.source_file(split)
        if file is not None:
            return self.read_file(file, split)
        if self.config.dataset is None:
            raise ConfigError(f"task {self.name}: no {split} data; set task.{split}_file or task.dataset")
        dataset_config = getattr(self.config, "dataset_config", None)
        rows = load_hf_split(self.config.dataset, dataset_config, HF_SPLITS[split])
        where = f"dataset {self.config.dataset!r} split {HF_SPLITS[split]!r}"
        return self.read_rows(rows, where)

    @abstractmethod
    def read_file(self, path: str, split: str) -> list:
        """Parse a local file into examples (non-empty), raising DataError on anything malformed."""

    @abstractmethod
    def read_rows(self, rows: Any, where: str) -> list:
        """Turn a `datasets` split into the same examples as `read_file`."""

    def train_features(self, tokenizer: Any, input_names: list[str]) -> Features:
        return self.featurize(self.examples("train"), tokenizer, input_names, train=True)

    def eval_features(self, tokenizer: Any, input_names: list[str]) -> Features:
        return self.featurize(self.examples("eval"), tokenizer, input_names, train=False)

    @abstractmethod
    def featurize(self, examples: list, tokenizer: Any, input_names: list[str], train: bool) -> Features:
        """Tokenize examples; train features carry labels, eval features carry what `score` needs."""

    def deploy_settings(self) -> dict[str, Any]:
        """What the deployed artifact records besides the sequence length, so that it processes raw
        requests as this task did (`fastcpu_runtime.Pipeline`)."""
        return {}

    # -- metrics and loss ----------------------------------------------------------------------------
    @abstractmethod
    def score(
        self, outputs: dict[str, np.ndarray], features: Features
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Metrics (x100) and per-example predictions from model outputs aligned with eval features."""

    @abstractmethod
    def task_loss(self, logits: dict[str, Tensor], labels: dict[str, Tensor]) -> Tensor:
        """The supervised loss of the task's head, as HF computes it."""

    # -- caching -------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 over the loaded examples and every preprocessing setting: a teacher-cache key.

        File paths and dataset names are left out because the contents are hashed instead, so moving a
        file keeps the key and editing it changes the key. The tokenizer is not part of it: the caller
        combines this with the model's identity.
        """
        digest = hashlib.sha256()
        settings = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in SOURCE_KEYS}
        digest.update(json.dumps(settings, sort_keys=True).encode())
        for split in ("train", "eval"):
            if not self.has_source(split):
                continue
            digest.update(f"\n{split}\n".encode())
            for example in self.examples(split):
                digest.update(json.dumps(dataclasses.asdict(example), sort_keys=True).encode())
                digest.update(b"\n")
        return digest.hexdigest()
