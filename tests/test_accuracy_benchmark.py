"""benchmarks/accuracy.py: a real row end to end on fixture data (teacher fine-tuned, student trained and
scored on its artifact, the table and records written), and bad input refused before any work."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT

SCRIPT = ROOT / "benchmarks" / "accuracy.py"
TINY = [
    "task.max_seq_length=48",
    "teacher.training.max_steps=30",
    "teacher.training.learning_rate=5e-4",
    "training.max_steps=4",
    "training.batch_size=8",
    "pruning.frequency=1",
    "quantization.calibration_samples=8",
    "runtime.batch_size=8",
    "runtime.warmup=1",
    "runtime.rounds=2",
    "runtime.iterations=2",
]


def benchmark_module():
    """benchmarks/accuracy.py imported in-process (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def sst2_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("sst2")
    shutil.copy(FIXTURES / "sst2_tiny_train.tsv", data / "train.tsv")
    shutil.copy(FIXTURES / "sst2_tiny.tsv", data / "dev.tsv")
    return data


def test_one_row_is_trained_scored_on_its_artifact_and_tabled(tmp_path, sst2_dir):
    doc = tmp_path / "accuracy.md"
    args = ["--task", "sst2", "--data", str(sst2_dir), "--recipe", "magnitude", "--sparsity", "0.5"]
    args += ["--layers", "1", "--doc", str(doc), "--json", str(tmp_path / "rows.json")]
    args += ["--outputs", str(tmp_path / "out"), "--", *TINY, f"teacher.cache_dir={tmp_path / 'cache'}"]
    done = run(args, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert (row["task"], row["recipe"], row["sparsity"], row["layers"]) == ("sst2", "magnitude", 0.5, 1)
    result = json.loads((Path(row["artifact"]).parent / "result.json").read_text())
    assert (
        row["student_score"] == result["accuracy"] and row["teacher_score"] == result["teacher_accuracy"] > 0
    )
    assert row["relative_drop"] == pytest.approx(
        (row["teacher_score"] - row["student_score"]) / row["teacher_score"]
    )
    assert row["throughput"] > 0 and row["train_seconds"] > 0 and row["backend"].startswith("auto ->")
    assert json.loads(doc.with_suffix(".json").read_text()) == [row]
    assert "| sst2 | 1 | 50% | magnitude |" in doc.read_text()


def test_a_row_measured_again_replaces_the_stored_one(tmp_path):
    accuracy = benchmark_module()
    row = {"task": "sst2", "recipe": "magnitude", "sparsity": 0.5, "layers": 1, "overrides": []}
    other = row | {"sparsity": 0.8}
    records = tmp_path / "rows.json"
    accuracy.merge(records, [row | {"student_score": 1.0}, other])
    merged = accuracy.merge(records, [row | {"student_score": 2.0}])
    assert merged == [row | {"student_score": 2.0}, other] == json.loads(records.read_text())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "sst2", "--data", "nowhere"], "SST-2 needs a directory with train.tsv and dev.tsv"),
        (["--task", "squad", "--data", "nowhere"], "SQuAD needs dev-v1.1.json"),
        (
            ["--task", "sst2", "--data", ".", "--recipe", "nope"],
            "unknown recipe(s) ['nope']; allowed: default",
        ),
        (["--task", "sst2", "--data", ".", "--sparsity", "1"], "--sparsity [1.0]: allowed [0, 1)"),
        (["--task", "mnli", "--data", "."], "invalid choice: 'mnli'"),
    ],
)
def test_bad_input_is_one_error_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        benchmark_module().main(args)
    assert exited.value.code != 0 and message in f"{exited.value.code}{capsys.readouterr().err}"
    assert not (tmp_path / "outputs").exists()


def test_a_layer_count_the_teacher_lacks_is_refused_before_training(tmp_path, sst2_dir):
    done = run(
        ["--task", "sst2", "--data", str(sst2_dir), "--layers", "9", "--doc", str(tmp_path / "a.md")],
        tmp_path,
    )
    assert done.returncode != 0 and "--layers 9: the teacher has 6 layers" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "a.json").exists()


def test_a_sequence_length_the_teacher_cannot_read_is_refused_before_training(tmp_path, sst2_dir):
    doc = tmp_path / "a.md"
    args = ["--task", "sst2", "--data", str(sst2_dir), "--layers", "1", "--doc", str(doc)]
    done = run([*args, "--", "task.max_seq_length=600"], tmp_path)
    assert done.returncode != 0, done.stderr[-2000:]
    assert "accuracy: error: task.max_seq_length=600 exceeds what the teacher (" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "outputs").exists()
