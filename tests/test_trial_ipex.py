"""A tiny trial through the real command on the ipex backend: the whole of fastcpu (training, export,
static int8 calibration, MLflow) runs in the IPEX environment (torch 2.8), not only the runtime.

IPEX pins torch 2.8, so this runs in the separate IPEX environment (README, .ci/run's IPEX step); in the
main environment it skips.
"""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from test_trial_e2e import TINY_TRIAL, assert_scores_are_the_predictions, run_fastcpu

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    ipex = pytest.importorskip("intel_extension_for_pytorch")
    workdir = tmp_path_factory.mktemp("ipex_trial")
    done = run_fastcpu(workdir, [*TINY_TRIAL, "runtime=ipex"], "trial")
    assert done.returncode == 0, done.stderr[-4000:]
    return workdir, ipex.__version__.split("+")[0]


def test_trial_is_measured_on_ipex(trial):
    workdir, version = trial
    result = json.loads((workdir / "trial" / "result.json").read_text())
    assert result["backend"] == "ipex" and result["scheme"] == "static_int8"
    assert result["backend_description"] == f"ipex {version} static int8 (torch.jit, freeze)"
    assert result["throughput"] > 0
    assert_scores_are_the_predictions(
        result, json.loads((workdir / "trial" / "predictions.json").read_text())
    )
    assert result["sparsity"] == pytest.approx(0.8, abs=0.02)


def test_trial_leaves_a_finished_mlflow_run(trial):
    workdir, _ = trial
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fastcpu").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["runtime.backend"] == "ipex"
    result = json.loads((workdir / "trial" / "result.json").read_text())
    assert result["mlflow_run_id"] == run.info.run_id
    for key in ("f1", "throughput", "latency_p90_ms"):
        assert run.data.metrics[key] == pytest.approx(result[key]), key
