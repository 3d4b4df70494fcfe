"""Two workers share one study on a real PostgreSQL server: both run the same command with the same
storage URL and study name, the study ends with exactly n_trials complete trials, and every trial is
an MLflow child run of the study's one parent run in a shared MLflow store on the same server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from test_trial_e2e import TINY_TRIAL

N_TRIALS = 4
STUDY = "two_workers"
WORKERS = ("worker_a", "worker_b")
TIMEOUT = 600  # seconds for both workers together


def worker_command(workdir: Path, postgres_url: str, name: str) -> list[str]:
    overrides = [
        o for o in TINY_TRIAL if o != "~search" and not o.startswith("quantization.")
    ]  # the sweep picks the quantization option; calibration_samples may not exist in it
    return [
        sys.executable,
        "-m",
        "fastcpu",
        *overrides,
        "runtime=eager",  # fast trials: no compilation
        "pruning=magnitude_4x1",  # nor least-squares solves: the shared study is under test
        f"search.storage={postgres_url}/optuna",
        f"search.study_name={STUDY}",
        f"search.n_trials={N_TRIALS}",
        "search.startup_trials=2",
        f"tracking.uri={postgres_url}/mlflow",
        f"teacher.cache_dir={workdir / 'cache'}",  # shared: one worker tunes the teacher, one waits
        f"hydra.run.dir={workdir / name}",
    ]


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path, postgres_url):
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # two workers on a small machine: no oversubscription
    workers = {}
    for name in WORKERS:
        log = (tmp_path / f"{name}.log").open("w")
        command = worker_command(tmp_path, postgres_url, name)
        workers[name] = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
        )
    deadline = time.monotonic() + TIMEOUT
    try:
        for process in workers.values():
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in workers.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in WORKERS}
    for name, process in workers.items():
        assert process.returncode == 0, f"{name} exited {process.returncode}:\n{logs[name][-6000:]}"

    study = optuna.load_study(study_name=STUDY, storage=f"{postgres_url}/optuna")
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == N_TRIALS, [(t.number, t.state.name, t.user_attrs.get("error")) for t in trials]
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    trial_runs = {t.user_attrs["mlflow_run_id"] for t in complete}
    assert len(trial_runs) == N_TRIALS and None not in trial_runs

    client = MlflowClient(f"{postgres_url}/mlflow")
    experiment = client.get_experiment_by_name("fastcpu")
    (parent,) = client.search_runs(
        [experiment.experiment_id], f"tags.`fastcpu.role` = 'study' and tags.`fastcpu.study` = '{STUDY}'"
    )
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert all(run.info.status == "FINISHED" for run in children)
    assert {run.info.run_id for run in children} == trial_runs and len(children) == N_TRIALS
    for run in children:
        assert run.data.tags["fastcpu.study"] == STUDY
    assert sorted(int(run.data.tags["fastcpu.trial"]) for run in children) == sorted(
        t.number for t in complete
    )

    # both workers took part (each trial runs in its worker's output folder), the teacher was tuned once
    for name in WORKERS:
        assert list((tmp_path / name).glob("trial_*")), f"{name} ran no trial:\n{logs[name][-4000:]}"
    assert sum("fine-tuning the teacher" in log for log in logs.values()) == 1, logs
