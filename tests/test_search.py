"""A seeded study on tiny trials through the real command: real Optuna sqlite storage, real MLflow
store, real optuna-dashboard. The printed Pareto front must equal a brute-force non-dominated filter of
the feasible complete trials; a failing trial, a constraint and an interruption must not spoil it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from conftest import FIXTURES
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from test_trial_e2e import TINY_TRIAL

pytestmark = pytest.mark.slow

N_TRIALS = 5
SWEEP = """\
# A tiny search space: student.layers [0, 9] cannot be built from a 6-layer teacher, so trials that
# draw it fail; sparsity below 0.6 violates the constraint.
params:
  pruning.sparsity: {type: float, low: 0.3, high: 0.9}
  distillation.logit_kd.weight: {type: float, low: 0.2, high: 0.9}
  student.layers: {type: categorical, choices: [[0], [0, 1], [0, 9]]}
fixed:
  runtime: eager
objectives:
  f1: maximize
  throughput: maximize
constraints:
  - sparsity >= 0.6
"""
TINY_STUDY = [
    *(o for o in TINY_TRIAL if o not in ("~search", "quantization.calibration_samples=8")),
    "runtime=eager",  # the references too (the sweep fixes it for the trials): no compilation
    "pruning=magnitude_4x1",  # the study is under test, not the pruner: no least-squares solves
]


def study_command(
    workdir: Path, name: str, n_trials: int, out: str, *extra: str, sweep: str = "sweep.yaml"
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fastcpu",
        *TINY_STUDY,
        f"search.sweep={workdir / sweep}",
        f"search.storage={storage(workdir)}",
        f"search.study_name={name}",
        f"search.n_trials={n_trials}",
        "search.startup_trials=50",  # random sampling throughout: the seed alone fixes what is drawn
        "search.seed=10",
        "search.latency_budget_ms=100000",
        *extra,
        f"teacher.cache_dir={workdir / 'cache'}",
        f"hydra.run.dir={workdir / out}",
    ]


def rerun(command: list[str], workdir: Path, out: str) -> subprocess.CompletedProcess:
    """`command` (a study_command) run again to completion, writing its outputs to `out`."""
    again = command[:-1] + [f"hydra.run.dir={workdir / out}"]
    return subprocess.run(again, cwd=workdir, capture_output=True, text=True, timeout=900)


def storage(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'optuna.db'}"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    (workdir / "sweep.yaml").write_text(SWEEP)
    (workdir / "sweep_ok.yaml").write_text(SWEEP.replace(", [0, 9]]", "]"))  # nothing fails
    command = study_command(workdir, "tiny", N_TRIALS, "out")
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return workdir, done.stdout, optuna.load_study(study_name="tiny", storage=storage(workdir))


def front_numbers(printed: str) -> set[int]:
    """Trial numbers of the table the command printed (the rows after the dashed rule)."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Pareto front of study")) + 3
    rows = []
    for line in lines[start:]:
        if not line.strip() or not line.split()[0].isdigit():
            break
        rows.append(int(line.split()[0]))
    return set(rows)


def brute_force_front(study: optuna.Study) -> set[int]:
    signs = [1 if d == optuna.study.StudyDirection.MAXIMIZE else -1 for d in study.directions]
    feasible = [
        t
        for t in study.trials
        if t.state == TrialState.COMPLETE and all(v <= 0 for v in t.constraints.values())
    ]

    def dominates(a, b) -> bool:
        pairs = [(s * x, s * y) for s, x, y in zip(signs, a.values, b.values, strict=True)]
        return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)

    return {t.number for t in feasible if not any(dominates(o, t) for o in feasible)}


def test_printed_front_equals_brute_force_filter(study):
    _, stdout, loaded = study
    assert front_numbers(stdout) == brute_force_front(loaded) != set()
    assert loaded.metric_names == ["f1", "throughput"]


def test_study_reaches_the_requested_complete_trials_despite_failures(study):
    _, _, loaded = study
    states = [t.state for t in loaded.trials]
    assert states.count(TrialState.COMPLETE) == N_TRIALS
    failed = [t for t in loaded.trials if t.state == TrialState.FAIL]
    assert failed, "seed 10 draws student.layers [0, 9] at least once"
    assert all(json.loads(t.params["student.layers"]) == [0, 9] for t in failed)
    assert all("student.layers" in t.user_attrs["error"] for t in failed)


def test_constraint_violating_trials_never_on_the_front(study):
    _, stdout, loaded = study
    infeasible = {
        t.number
        for t in loaded.trials
        if t.state == TrialState.COMPLETE and t.constraints["sparsity >= 0.6"] > 0
    }
    assert infeasible, "seed 10 draws a sparsity below 0.6 at least once"
    assert not infeasible & front_numbers(stdout)
    assert all(t.user_attrs["sparsity"] < 0.6 for t in loaded.trials if t.number in infeasible)


def test_trials_carry_their_measurements_for_the_dashboard(study):
    _, _, loaded = study
    for trial in loaded.get_trials(states=(TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        assert attrs["throughput"] == trial.values[1] > 0
        assert attrs["latency_p90_ms"] > 0 and attrs["model_mb"] > 0 and 0 <= attrs["sparsity"] < 1
        teacher = loaded.user_attrs["reference"]["teacher"]["throughput"]
        assert attrs["speedup"] == pytest.approx(attrs["throughput"] / teacher)
        assert Path(attrs["artifact"], "manifest.json").is_file()
        assert Path(attrs["output_dir"], "result.json").is_file()


def test_mlflow_parent_run_with_one_child_per_trial(study):
    workdir, _, loaded = study
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fastcpu").experiment_id
    parents = client.search_runs([experiment], "tags.`fastcpu.role` = 'study'")
    assert [p.info.run_id for p in parents] == [loaded.user_attrs["mlflow_parent_run_id"]]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_complete"] == N_TRIALS
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "pareto.csv",
        "pareto.png",
        "pareto.html",
    }
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == len(loaded.trials)
    by_id = {c.info.run_id: c for c in children}
    for trial in loaded.trials:
        if trial.state == TrialState.COMPLETE:
            child = by_id[trial.user_attrs["mlflow_run_id"]]
            assert child.info.status == "FINISHED" and child.data.metrics["f1"] == trial.values[0]
            assert child.data.tags["fastcpu.trial"] == str(trial.number)
            assert child.data.tags["fastcpu.study"] == "tiny"
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(failed) == sum(t.state == TrialState.FAIL for t in loaded.trials)
    assert all("student.layers" in c.data.tags["error"] for c in failed)


def test_pareto_plot_files(study):
    workdir, _, loaded = study
    out = workdir / "out"
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "pareto.html").read_text()
    assert "Pareto front" in html and "teacher (reference)" in html and "uncompressed (reference)" in html
    rows = (out / "pareto.csv").read_text().splitlines()
    assert len(rows) == 1 + N_TRIALS


def test_pareto_command_reprints_a_stored_study(study):
    workdir, stdout, _ = study
    command = [
        sys.executable,
        "-m",
        "fastcpu.pareto",
        "--study",
        "tiny",
        "--storage",
        storage(workdir),
        "--out",
        str(workdir / "again"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert front_numbers(done.stdout) == front_numbers(stdout)
    assert "best trial:" in done.stdout and (workdir / "again" / "pareto.png").exists()
    missing = subprocess.run(
        [*command[:4], "nope", *command[5:]], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and "no study 'nope'" in missing.stderr and "tiny" in missing.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_optuna_dashboard_serves_the_study(study):
    workdir, _, loaded = study
    port = free_port()
    dashboard = Path(sys.executable).with_name("optuna-dashboard")
    server = subprocess.Popen(
        [str(dashboard), storage(workdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        studies = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        served = next(s for s in studies if s["study_name"] == "tiny")
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{served['study_id']}?after=0")
        assert len(detail["trials"]) == len(loaded.trials)
        assert detail["objective_names"] == ["f1", "throughput"]
        attrs = {a["key"] for t in detail["trials"] for a in t["user_attrs"]}
        assert {"throughput", "latency_p90_ms", "model_mb", "sparsity", "mlflow_run_id"} <= attrs
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_until_up(url: str, server: subprocess.Popen, timeout: float) -> None:
    """Poll `url` until it answers 200; fail if the server exits or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not come up (server exit code {server.poll()})")


def printed_best(printed: str) -> int:
    """The number of the trial the command named its pick ("best trial ...: N (...)")."""
    line = next(line for line in printed.splitlines() if line.startswith("best trial"))
    return int(line.split(": ", 1)[1].split()[0])


def test_study_pick_is_registered_and_served_over_http(study):
    """The study's pick becomes version 1 of `fastcpu-squad`, tagged with its trial and metrics;
    `mlflow models serve` of models:/fastcpu-squad/latest answers a real HTTP request as the trial did."""
    workdir, printed, loaded = study
    uri = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    best = loaded.trials[printed_best(printed)]
    version = MlflowClient(uri).get_model_version("fastcpu-squad", "1")
    assert version.tags["fastcpu.trial"] == str(best.number)
    assert float(version.tags["f1"]) == best.values[0] and version.run_id == best.user_attrs["mlflow_run_id"]
    article = json.loads((FIXTURES / "squad_tiny.json").read_text())["data"][3]
    rows = [(qa["id"], qa["question"], p["context"]) for p in article["paragraphs"] for qa in p["qas"]]
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [
        str(mlflow_cli),
        "models",
        "serve",
        "-m",
        "models:/fastcpu-squad/latest",
        "--env-manager",
        "local",
    ]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ['PATH']}",
    }
    server = subprocess.Popen(
        [*command, "-h", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", server, timeout=180)
        body = {
            "dataframe_records": [{"question": question, "context": context} for _, question, context in rows]
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answers = json.loads(response.read())["predictions"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    predictions = json.loads((Path(best.user_attrs["output_dir"]) / "predictions.json").read_text())
    assert {qid: answer["answer"] for (qid, *_), answer in zip(rows, answers, strict=True)} == predictions
    assert all(0.0 <= answer["score"] <= 1.0 for answer in answers)


def wait_for_running_trial(
    process: subprocess.Popen, workdir: Path, name: str, *, after_a_complete_one: bool
) -> None:
    """Poll the study until its newest trial is running (and, if asked, an earlier one is complete),
    the process has ended, or 10 minutes have passed."""
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline:
        try:
            trials = optuna.load_study(study_name=name, storage=storage(workdir)).trials
        except KeyError:
            trials = []
        complete = any(t.state == TrialState.COMPLETE for t in trials) or not after_a_complete_one
        if trials and complete and trials[-1].state == TrialState.RUNNING:
            return
        time.sleep(0.1)


def test_interrupted_study_resumes_and_keeps_completed_trials(study):
    workdir, _, _ = study  # reuses the fixture's cached teacher
    # 40 training steps: each trial runs long enough to be interrupted mid-way
    command = study_command(
        workdir,
        "resumed",
        3,
        "first",
        "search.references=false",
        "training.max_steps=40",
        sweep="sweep_ok.yaml",
    )
    first = subprocess.Popen(
        command,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background jobs inherit SIGINT as ignored; Ctrl-C in a terminal is not
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for_running_trial(first, workdir, "resumed", after_a_complete_one=True)
    assert first.poll() is None, "the study ended before it could be interrupted"
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode != 0 and "the same command resumes the study" in stderr, stderr[-3000:]
    interrupted = optuna.load_study(study_name="resumed", storage=storage(workdir)).trials
    kept = {t.number: t.values for t in interrupted if t.state == TrialState.COMPLETE}
    assert kept and not any(t.state == TrialState.RUNNING for t in interrupted)

    done = rerun(command, workdir, "second")
    assert done.returncode == 0, done.stderr[-4000:]
    final = optuna.load_study(study_name="resumed", storage=storage(workdir)).trials
    complete = {t.number: t.values for t in final if t.state == TrialState.COMPLETE}
    assert len(complete) == 3 and all(complete[n] == v for n, v in kept.items())


def test_killed_worker_trial_is_failed_by_heartbeat_and_study_goes_on(study):
    workdir, _, _ = study
    heartbeat = ["search.references=false", "search.heartbeat_interval=1", "search.grace_period=3"]
    command = study_command(
        workdir, "killed", 2, "killed", *heartbeat, "training.max_steps=40", sweep="sweep_ok.yaml"
    )
    worker = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_running_trial(worker, workdir, "killed", after_a_complete_one=False)
    # Optuna fails only stale trials that recorded a heartbeat: let the first one (interval 1 s) be written
    time.sleep(2)
    worker.kill()  # no chance to clean up: its running trial stays RUNNING in the storage
    worker.wait()
    (orphan,) = [t for t in optuna.load_study(study_name="killed", storage=storage(workdir)).trials]
    assert orphan.state == TrialState.RUNNING

    done = rerun(command, workdir, "after_kill")
    assert done.returncode == 0, done.stderr[-4000:]
    trials = optuna.load_study(study_name="killed", storage=storage(workdir)).trials
    assert trials[orphan.number].state == TrialState.FAIL
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2


def test_study_without_a_complete_trial_fails_loudly(study):
    """Every trial fails: the command exits non-zero with one line naming the error, and the MLflow
    parent run ends FAILED instead of FINISHED."""
    workdir, _, _ = study
    (workdir / "sweep_broken.yaml").write_text(SWEEP.replace("[[0], [0, 1], [0, 9]]", "[[0, 9]]"))
    cwd = workdir / "broken"  # its own MLflow store: the other tests count the parent runs of theirs
    cwd.mkdir()
    command = study_command(
        workdir, "broken", 2, "out_broken", "search.references=false", sweep="sweep_broken.yaml"
    )
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stderr[-4000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fastcpu: error: study 'broken': no trial completed; 2 failed: 2x "), last
    assert "student.layers" in last
    client = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fastcpu").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`fastcpu.role` = 'study'")
    assert parent.info.status == "FAILED" and parent.data.metrics["n_complete"] == 0


def test_a_study_whose_front_misses_the_latency_budget_says_nothing_was_registered(study):
    """The finished study run again (no trial left to run) with a budget no trial fits: no pick, and the
    command says why `models:/...` will not be there instead of leaving the user to find out."""
    workdir, _, _ = study  # the study's MLflow store holds its parent run: last in this file, it is rewritten
    command = study_command(workdir, "tiny", N_TRIALS, "out_tight", "search.latency_budget_ms=0.001")
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "best trial within p90 latency <= 0.001 ms: none" in done.stdout
    assert "nothing registered as fastcpu-squad: no front trial's p90 latency fits 0.001 ms" in done.stdout
