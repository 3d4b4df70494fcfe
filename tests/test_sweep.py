"""Sweep files and the `search` section: every shipped sweep is valid against its experiment, and each
kind of mistake stops with one message before any trial runs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import optuna
import pytest
from conftest import CONF, compose_config

from fastcpu.config import ConfigError, build
from fastcpu.search import SearchConfig, open_storage, study_metrics
from fastcpu.sweep import SWEEPS_DIR, hydra_value, load_sweep
from fastcpu.tasks import make_task
from fastcpu.trial import TrialConfig, result_metrics

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def composer(experiment: str):
    return lambda extra: TrialConfig.from_hydra(compose_config([f"+experiment={experiment}", *extra]))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_names_a_valid_sweep(experiment):
    cfg = compose_config([f"+experiment={experiment}"])
    search = build(SearchConfig, cfg.search, "search")
    assert {f.name for f in dataclasses.fields(SearchConfig)} == set(cfg.search), "search lacks a field"
    sweep = load_sweep(search.sweep)
    sweep.check_metrics(study_metrics(make_task(TrialConfig.from_hydra(cfg).task), search.references))
    sweep.check_keys(composer(experiment))


def test_every_sweep_file_is_used_by_an_experiment():
    used = {compose_config([f"+experiment={e}"]).search.sweep for e in EXPERIMENTS}
    assert {p.stem for p in SWEEPS_DIR.glob("*.yaml")} == used


def test_squad_sweep_searches_the_issue_keys():
    sweep = load_sweep("squad")
    keys = {p.key for p in sweep.params}
    assert {"pruning.sparsity", "pruning.pattern", "distillation.logit_kd.temperature"} <= keys
    assert {"quantization", "student.layers", "training.learning_rate"} <= keys
    assert [(o.name, o.direction) for o in sweep.objectives] == [
        ("f1", "maximize"),
        ("throughput", "maximize"),
    ]
    assert sweep.constraints


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("pruning.sparsity", 0.75),
        ("pruning.pattern", "4x1"),
        ("student.layers", (0, 2, 4)),
        ("training.learning_rate", 3.0e-5),
        ("name", "a b's study"),
        ("training.max_steps", None),
        ("tracking.enabled", False),
    ],
)
def test_suggested_values_reach_the_config_unchanged(key, value):
    """What Optuna suggests is written as a Hydra override that composes back to the same value."""
    cfg = compose_config(["+experiment=squad", f"{key}={hydra_value(value)}"])
    node = cfg
    for part in key.split("."):
        node = node[part]
    assert (list(node) if isinstance(value, tuple) else node) == (
        list(value) if isinstance(value, tuple) else value
    )


def write_sweep(tmp_path, body: str):
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent(body))
    return path


GOOD = "params:\n  pruning.sparsity: {type: float, low: 0.5, high: 0.9}\nobjectives:\n  f1: maximize\n"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "params:\n  pruning.sparsity: {type: float, low: 0.9, high: 0.9}\nobjectives: {f1: maximize}\n",
            "empty range [0.9, 0.9]",
        ),
        (
            "params:\n  quantization: {type: categorical, choices: []}\nobjectives: {f1: maximize}\n",
            "choices must be a non-empty list",
        ),
        (
            "params:\n  pruning.sparsity: {type: uniform, low: 0, high: 1}\nobjectives: {f1: maximize}\n",
            "needs type: one of float, int, categorical",
        ),
        (
            GOOD.replace("high: 0.9}", "high: 0.9, q: 2}"),
            "unknown key(s) ['q']",
        ),
        (GOOD + "  throughput: fastest\n", "objectives.throughput='fastest'; allowed: maximize, minimize"),
        (GOOD + "constraints: [latency < 10]\n", "is not 'METRIC <= NUMBER'"),
        (GOOD.replace("objectives:\n  f1: maximize\n", ""), "objectives must name at least one result"),
        (GOOD + "searchspace: {}\n", "unknown key(s) ['searchspace']"),
    ],
)
def test_malformed_sweep_file_is_one_clear_error(tmp_path, body, message):
    with pytest.raises(ConfigError) as error:
        load_sweep(str(write_sweep(tmp_path, body)))
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("param", "message"),
    [
        (
            "pruning.sparsty: {type: float, low: 0.5, high: 0.9}",
            "params.pruning.sparsty=0.5: Could not override",
        ),
        ("quantization: {type: categorical, choices: [static_int8, int4]}", "params.quantization='int4'"),
        ("pruning.sparsity: {type: float, low: 0.5, high: 1.5}", "pruning.sparsity=1.5 is out of range"),
    ],
)
def test_sweep_key_checked_against_the_composed_config(tmp_path, param, message):
    sweep = load_sweep(str(write_sweep(tmp_path, f"params:\n  {param}\nobjectives: {{f1: maximize}}\n")))
    with pytest.raises(ConfigError) as error:
        sweep.check_keys(composer("squad"))
    assert message in str(error.value)


def test_objective_no_trial_produces_is_an_error(tmp_path):
    sweep = load_sweep(
        str(
            write_sweep(
                tmp_path,
                "params:\n  seed: {type: int, low: 1, high: 3}\n"
                "objectives: {f1: maximize, speed: maximize}\n",
            )
        )
    )
    with pytest.raises(ConfigError, match=r"no trial produces \['speed'\]; allowed: .*throughput"):
        sweep.check_metrics(result_metrics(make_task(TrialConfig.from_hydra(compose_config([])).task)))


def test_unknown_sweep_name_lists_the_available_ones():
    with pytest.raises(ConfigError, match="available in sweeps/: .*squad"):
        load_sweep("squid")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://fastcpu:secret@127.0.0.1:9/optuna",
        "nosuchdialect://x/y",
        "sqlite:////no/such/dir/x.db",
    ],
)
def test_unreachable_storage_is_one_clear_error(url):
    with pytest.raises(ConfigError) as error:
        open_storage(SearchConfig(storage=url))
    text = str(error.value)
    assert (
        "cannot be opened" in text and "secret" not in text and "allowed: a reachable SQLAlchemy URL" in text
    )


BAD_SWEEP = "params:\n  pruning.sparsty: {type: float, low: 0.5, high: 0.9}\nobjectives: {f1: maximize}\n"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (lambda tmp: [f"search.sweep={write_sweep(tmp, BAD_SWEEP)}"], ["params.pruning.sparsty"]),
        (lambda tmp: ["search.references=false"], ["uses speedup", "search.references=false"]),
    ],
    ids=["misspelt-key", "speedup-without-references"],
)
def test_cli_rejects_a_bad_sweep_before_any_trial(tmp_path, overrides, named):
    storage = tmp_path / "optuna.db"
    command = [
        sys.executable,
        "-m",
        "fastcpu",
        "+experiment=squad",
        *overrides(tmp_path),
        f"search.storage=sqlite:///{storage}",
        f"hydra.run.dir={tmp_path / 'out'}",
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("fastcpu: error:")]
    assert len(errors) == 1 and all(fragment in errors[0] for fragment in named), done.stderr[-2000:]
    assert not storage.exists() and not (tmp_path / "mlruns").exists()


def test_existing_study_with_other_objectives_is_refused(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=storage, directions=["maximize"]).set_metric_names(["f1"])
    from fastcpu.search import open_study

    with pytest.raises(ConfigError, match="already exists with objectives"):
        open_study(SearchConfig(storage=storage, study_name="s"), load_sweep("squad"))


@pytest.mark.parametrize(
    ("sampler", "kind"), [("tpe", optuna.samplers.TPESampler), ("nsga2", optuna.samplers.NSGAIISampler)]
)
def test_sampler_is_selectable_and_seeded(sampler, kind):
    from fastcpu.search import make_sampler

    config = build(
        SearchConfig, compose_config(["+experiment=squad", f"search.sampler={sampler}"]).search, "search"
    )
    proposals = []
    for _ in range(2):
        study = optuna.create_study(sampler=make_sampler(config), directions=["maximize", "maximize"])
        study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=3)
        proposals.append([t.params for t in study.trials])
    assert isinstance(make_sampler(config), kind) and proposals[0] == proposals[1]


def test_unknown_sampler_is_refused():
    with pytest.raises(ConfigError, match="search.sampler='cmaes' is unknown; allowed: tpe, nsga2"):
        build(SearchConfig, {"sampler": "cmaes"}, "search")


ENQUEUE = """\
params:
  pruning.sparsity: {type: float, low: 0.0, high: 0.9}
  student.layers: {type: categorical, choices: [[0, 2, 4], [0, 1, 2, 3, 4, 5]]}
enqueue:
  - {student.layers: [0, 1, 2, 3, 4, 5], pruning.sparsity: 0.0}
  - {student.layers: [0, 2, 4]}
objectives: {f1: maximize}
"""


def test_enqueued_points_are_the_first_trials_then_the_sampler_takes_over(tmp_path):
    from fastcpu.search import open_study

    sweep = load_sweep(str(write_sweep(tmp_path, ENQUEUE)))
    sweep.check_keys(composer("squad"))
    config = SearchConfig(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s")
    study, created = open_study(config, sweep)
    suggested = []
    study.optimize(lambda trial: suggested.append(sweep.suggest(trial)) or 0.0, n_trials=3)
    assert created and suggested[0] == ["pruning.sparsity=0.0", "student.layers=[0,1,2,3,4,5]"]
    assert suggested[1][1] == "student.layers=[0,2,4]" and suggested[1][0] != "pruning.sparsity=0.0"
    again, created = open_study(config, sweep)  # a resumed study does not queue them twice
    assert not created and len(again.trials) == 3


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ("{student.layers: [0, 5]}", "enqueue[0].student.layers=[0, 5] is not a choice; allowed: [0, 2, 4]"),
        ("{pruning.sparsity: 0.95}", "enqueue[0].pruning.sparsity=0.95; allowed: a number in [0.0, 0.9]"),
        ("{training.epochs: 2}", "enqueue[0]: unknown key(s) ['training.epochs']; allowed: pruning.sparsity"),
        ("[0.5]", "enqueue[0] must be a mapping"),
    ],
)
def test_bad_enqueued_point_is_one_clear_error(tmp_path, point, message):
    body = ENQUEUE.replace("  - {student.layers: [0, 2, 4]}\n", "").replace(
        "  - {student.layers: [0, 1, 2, 3, 4, 5], pruning.sparsity: 0.0}", f"  - {point}"
    )
    with pytest.raises(ConfigError) as error:
        load_sweep(str(write_sweep(tmp_path, body)))
    assert message in str(error.value)
