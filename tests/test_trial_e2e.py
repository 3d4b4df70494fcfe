"""A tiny end-to-end trial through the real command: real MiniLM weights, real PT2E int8 runtime,
real MLflow sqlite store. Also: the teacher cache is reused, and bad data fails cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import FIXTURES
from mlflow.tracking import MlflowClient

import fastcpu_runtime as rt
from fastcpu.tasks.squad_metrics import squad_evaluate
from fastcpu.tasks.sst2 import parse_tsv

TINY_TRIAL = [
    "+experiment=squad",
    "~search",  # one trial, not the experiment's study
    f"task.train_file={FIXTURES / 'squad_tiny.json'}",
    f"task.eval_file={FIXTURES / 'squad_tiny.json'}",
    "task.holdout_every=4",
    "task.holdout_offset=3",
    "task.max_seq_length=96",
    "task.doc_stride=32",
    "teacher.training.max_steps=30",  # enough for F1 > 0 on the held-out article (a 0 teacher is refused)
    "teacher.training.batch_size=8",
    "teacher.training.learning_rate=5e-4",
    "student.layers=[0]",
    "training.max_steps=6",
    "training.batch_size=8",
    "pruning.frequency=1",
    "quantization.calibration_samples=8",
    "runtime.batch_size=4",
    "runtime.warmup=1",
    "runtime.rounds=2",
    "runtime.iterations=2",
]


def assert_scores_are_the_predictions(result: dict, predictions: dict) -> None:
    """The reported F1/EM are the official metric of the deployed model's predictions on the held-out
    article, and the relative drop is against the (non-zero) teacher."""
    article = json.loads((FIXTURES / "squad_tiny.json").read_text())["data"][3]
    gold = {qa["id"]: [a["text"] for a in qa["answers"]] for p in article["paragraphs"] for qa in p["qas"]}
    assert set(predictions) == set(gold)
    scores = squad_evaluate(gold, predictions)
    assert result["f1"] == pytest.approx(scores["f1"]) and result["exact_match"] == pytest.approx(
        scores["exact_match"]
    )
    assert result["teacher_f1"] > 0
    assert result["relative_drop"] == pytest.approx(
        (result["teacher_f1"] - result["f1"]) / result["teacher_f1"]
    )


def run_fastcpu(workdir: Path, overrides: list[str], name: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fastcpu", *overrides, f"hydra.run.dir={workdir / name}"]
    command.append(f"teacher.cache_dir={workdir / 'cache'}")
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e")
    done = run_fastcpu(workdir, TINY_TRIAL, "first")
    assert done.returncode == 0, done.stderr[-4000:]
    return workdir, done


def test_trial_writes_result_predictions_and_artifact(trial):
    workdir, _ = trial
    out = workdir / "first"
    result = json.loads((out / "result.json").read_text())
    for key in (
        "f1",
        "exact_match",
        "teacher_f1",
        "throughput",
        "latency_p50_ms",
        "latency_p90_ms",
        "model_mb",
    ):
        assert isinstance(result[key], float), key
    assert result["throughput"] > 0 and result["latency_p90_ms"] >= result["latency_p50_ms"] > 0
    assert result["scheme"] == "static_int8" and "int8" in result["backend_description"]
    # 80% of each row group's 4x1 blocks (307 of 384, 1229 of 1536), plus the few weights int8 rounds to zero
    assert all(0.799 <= v < 0.82 for v in result["sparsity_per_layer"].values())
    assert result["sparsity"] == pytest.approx(0.8, abs=0.02)
    assert_scores_are_the_predictions(result, json.loads((out / "predictions.json").read_text()))
    manifest = json.loads((out / "artifact" / "manifest.json").read_text())
    assert manifest["quantization"]["scheme"] == "static_int8" and manifest["quantization"]["modules"]
    assert set(manifest["files"]) >= {"config.json", "model.safetensors", "calibration.safetensors"}


def test_deployed_pipeline_answers_as_the_trial_scored(trial):
    """Raw questions and contexts through `fastcpu_runtime`'s pipeline on the trial's artifact give the
    very predictions the trial scored (same backend, same batch shape)."""
    workdir, _ = trial
    predictions = json.loads((workdir / "first" / "predictions.json").read_text())
    article = json.loads((FIXTURES / "squad_tiny.json").read_text())["data"][3]
    rows = [(qa["id"], qa["question"], p["context"]) for p in article["paragraphs"] for qa in p["qas"]]
    pipeline = rt.load_pipeline(workdir / "first" / "artifact", batch_size=4)  # runtime.batch_size=4
    answers = pipeline([question for _, question, _ in rows], [context for *_, context in rows])
    assert {qid: answer.answer for (qid, _, _), answer in zip(rows, answers, strict=True)} == predictions
    assert any(predictions.values())  # not only empty answers


def test_trial_leaves_an_mlflow_run_with_metrics(trial):
    workdir, _ = trial
    assert (workdir / "mlruns" / "mlflow.db").exists()
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fastcpu")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    result = json.loads((workdir / "first" / "result.json").read_text())
    for key in ("f1", "exact_match", "teacher_f1", "throughput", "latency_p90_ms", "sparsity", "model_mb"):
        assert run.data.metrics[key] == pytest.approx(result[key]), key
    assert (
        run.data.params["pruning.sparsity"] == "0.8"
        and run.data.params["quantization.scheme"] == "static_int8"
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "predictions.json", "result.json", "artifact"} <= artifacts
    assert (workdir / "mlruns" / "artifacts").is_dir()


def test_a_lone_trial_logs_its_artifact_as_an_mlflow_model_that_answers(trial):
    """tracking.log_models=best (the default): a trial outside a study is its own pick. The logged
    pyfunc takes a table of questions and contexts and answers as the trial was scored."""
    workdir, _ = trial
    result = json.loads((workdir / "first" / "result.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(result["mlflow_model_uri"])
    assert model.metadata.get_input_schema().input_names() == ["question", "context"]
    article = json.loads((FIXTURES / "squad_tiny.json").read_text())["data"][3]
    rows = [(qa["id"], qa["question"], p["context"]) for p in article["paragraphs"] for qa in p["qas"]]
    table = pd.DataFrame([{"question": question, "context": context} for _, question, context in rows])
    answered = model.predict(table)
    assert list(answered.columns) == ["answer", "score", "start", "end"]
    predictions = json.loads((workdir / "first" / "predictions.json").read_text())
    assert dict(zip([qid for qid, *_ in rows], answered["answer"], strict=True)) == predictions


def test_second_trial_reuses_the_cached_teacher(trial):
    workdir, first = trial
    assert "fine-tuning the teacher" in first.stdout + first.stderr
    overrides = [o for o in TINY_TRIAL if not o.startswith(("pruning.", "quantization."))]
    second = [*overrides, "quantization=dynamic_int8", "pruning=none", "runtime=sparse"]
    done = run_fastcpu(workdir, second, "second")
    assert done.returncode == 0, done.stderr[-4000:]
    log = done.stdout + done.stderr
    assert "reusing the fine-tuned teacher" in log and "fine-tuning the teacher" not in log
    first_result = json.loads((workdir / "first" / "result.json").read_text())
    second_result = json.loads((workdir / "second" / "result.json").read_text())
    assert second_result["teacher_f1"] == first_result["teacher_f1"]
    assert (
        second_result["sparsity"] < 0.05 and second_result["scheme"] == "dynamic_int8"
    )  # int8 rounding zeros only


@pytest.mark.parametrize("content", ["", '{"version": "1.1", "data": [{"title": "x", "paragraphs": ['])
def test_bad_data_file_fails_cleanly(trial, content):
    workdir, _ = trial
    bad = workdir / "bad.json"
    bad.write_text(content)
    overrides = [*TINY_TRIAL, f"task.train_file={bad}", f"task.eval_file={bad}"]
    done = run_fastcpu(workdir, overrides, "bad")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("fastcpu: error: ")
    assert str(bad) in done.stderr and "Traceback" not in done.stderr
    assert not (workdir / "bad" / "result.json").exists() and not (workdir / "bad" / "artifact").exists()
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fastcpu").experiment_id], "tags.error != ''")
    assert runs and all(r.info.status == "FAILED" for r in runs)
    error_text = client.download_artifacts(runs[0].info.run_id, "error.txt", str(workdir))
    assert "Traceback" in Path(error_text).read_text()


def test_sst2_trial_on_local_tsv(tmp_path):
    """The classification path end to end, on a custom local TSV, dynamic int8, no tracking."""
    overrides = [
        "+experiment=sst2",
        "~search",
        f"task.train_file={FIXTURES / 'sst2_tiny_train.tsv'}",
        f"task.eval_file={FIXTURES / 'sst2_tiny.tsv'}",
        "task.max_seq_length=48",
        "teacher.training.max_steps=2",
        "student.layers=[5]",
        "training.max_steps=3",
        "quantization=dynamic_int8",
        "runtime.batch_size=8",
        "runtime.warmup=1",
        "runtime.rounds=2",
        "runtime.iterations=2",
        "tracking=off",
    ]
    done = run_fastcpu(tmp_path, overrides, "sst2")
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "sst2" / "result.json").read_text())
    predictions = json.loads((tmp_path / "sst2" / "predictions.json").read_text())
    rows = (FIXTURES / "sst2_tiny.tsv").read_text().splitlines()[1:]
    gold = [int(row.rsplit("\t", 1)[1]) for row in rows]
    assert len(predictions) == len(gold) == 40
    # The reported accuracy is the deployed student's predictions against the dev labels.
    assert result["accuracy"] == pytest.approx(
        100 * sum(predictions[str(i)] == g for i, g in enumerate(gold)) / 40
    )
    assert result["teacher_accuracy"] > 0 and result["relative_drop"] < 1
    assert result["scheme"] == "dynamic_int8" and result["mlflow_run_id"] is None
    assert not (tmp_path / "mlruns").exists()
    # The deployed pipeline labels the raw sentences as the trial did.
    pipeline = rt.load_pipeline(tmp_path / "sst2" / "artifact", batch_size=8)
    names = {name: index for index, name in pipeline.labels.items()}
    texts = [example.text for example in parse_tsv(str(FIXTURES / "sst2_tiny.tsv"), "sentence", "label")]
    assert [names[label.label] for label in pipeline(texts)] == [predictions[str(i)] for i in range(40)]
