"""GLUE SST-2 binary sentiment classification: TSV or `datasets` loading, accuracy scoring."""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastcpu.config import ConfigError
from fastcpu.tasks.base import (
    TASKS,
    DataConfig,
    DataError,
    Features,
    Task,
    check_outputs,
    read_text,
    require_columns,
    same_file,
)
from fastcpu_runtime.processing import encode_texts

NUM_LABELS = 2


@dataclass
class Sst2Config(DataConfig):
    name: str = "sst2"
    dataset_config: str | None = None
    text_column: str = "sentence"
    label_column: str = "label"
    max_seq_length: int = 128

    def validate(self, key: str) -> None:
        super().validate(key)
        if not self.text_column or not self.label_column or self.text_column == self.label_column:
            raise ConfigError(
                f"{key}.text_column and {key}.label_column must be two different non-empty column names "
                f"(got {self.text_column!r}, {self.label_column!r})"
            )
        if same_file(self.train_file, self.eval_file):
            raise ConfigError(
                f"{key}.train_file and {key}.eval_file are the same file ({self.train_file}); a model scored "
                "on its own training sentences says nothing: give the train and dev TSVs"
            )


@dataclass
class Sst2Example:
    text: str
    label: int


def parse_label(value: Any, where: str) -> int:
    """A 0/1 label from a TSV cell or a dataset value."""
    try:
        label = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise DataError(f"{where}: label {value!r} is not an integer") from None
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label not in (0, 1):
        raise DataError(f"{where}: label {value!r} must be 0 or 1")
    return int(label)


def parse_tsv(path: str, text_column: str, label_column: str) -> list[Sst2Example]:
    """Parse a GLUE-style TSV (header row, tab-separated, columns found by name). Blank lines are skipped."""
    lines = read_text(path).split("\n")
    header = lines[0].rstrip("\r").split("\t")
    hint = "; set task.text_column / task.label_column to match the header"
    require_columns(header, (text_column, label_column), f"{path}: line 1 (header)", hint)
    text_at, label_at = header.index(text_column), header.index(label_column)
    examples = []
    for number, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line:
            continue
        cells = line.split("\t")
        if len(cells) != len(header):
            raise DataError(
                f"{path}: line {number}: expected {len(header)} tab-separated columns like the header, "
                f"got {len(cells)}"
            )
        examples.append(Sst2Example(cells[text_at], parse_label(cells[label_at], f"{path}: line {number}")))
    if not examples:
        raise DataError(f"{path}: no data rows below the header")
    return examples


@TASKS.register("sst2", Sst2Config)
class Sst2Task(Task):
    name = "sst2"
    head = "sequence_classification"
    output_names = ("logits",)
    primary_metric = "accuracy"
    metric_names = ("accuracy",)
    auto_class_name = "AutoModelForSequenceClassification"
    architecture_suffix = "ForSequenceClassification"
    config: Sst2Config

    def model_kwargs(self) -> dict:
        return {"num_labels": NUM_LABELS}

    def _labels_match(self, model_config: Any) -> bool:
        return getattr(model_config, "num_labels", None) == NUM_LABELS

    # -- data ----------------------------------------------------------------------------------------
    def read_file(self, path: str, split: str) -> list[Sst2Example]:
        return parse_tsv(path, self.config.text_column, self.config.label_column)

    def read_rows(self, rows: Any, where: str) -> list[Sst2Example]:
        text_column, label_column = self.config.text_column, self.config.label_column
        require_columns(rows.column_names, (text_column, label_column), where)
        texts, labels = rows[text_column], rows[label_column]
        examples = [
            Sst2Example(str(text), parse_label(label, f"{where}: row {i}"))
            for i, (text, label) in enumerate(zip(texts, labels, strict=True))
        ]
        if not examples:
            raise DataError(f"{where}: no rows")
        return examples

    # -- features ------------------------------------------------------------------------------------
    def featurize(
        self, examples: list[Sst2Example], tokenizer: Any, input_names: list[str], train: bool
    ) -> Features:
        """Labels ride along in eval features too: `score` reads them, so subsets stay aligned."""
        texts = [example.text for example in examples]
        inputs = encode_texts(tokenizer, input_names, texts, self.config.max_seq_length)
        labels = torch.tensor([example.label for example in examples], dtype=torch.int64)
        return Features(inputs, {"labels": labels})

    # -- metrics and loss ----------------------------------------------------------------------------
    def score(
        self, outputs: dict[str, np.ndarray], features: Features
    ) -> tuple[dict[str, float], dict[str, Any]]:
        if "labels" not in features.labels:
            raise ValueError("SST-2 scoring needs features with labels (from eval_features)")
        logits = check_outputs(outputs, self.output_names, len(features))["logits"]
        predicted = logits.argmax(axis=1)
        gold = features.labels["labels"].numpy()
        accuracy = 100.0 * float((predicted == gold).mean())
        return {"accuracy": accuracy}, {str(i): int(p) for i, p in enumerate(predicted)}

    def task_loss(self, logits: dict[str, Tensor], labels: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(logits["logits"], labels["labels"].long())
