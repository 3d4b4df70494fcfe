"""The `search` section: an Optuna multi-objective study whose trials are fastcpu trials.

`python -m fastcpu +experiment=squad` runs a study when the composed config has a `search` section.
Each trial composes its own config with Hydra's compose API (the command line's overrides, the
sweep's fixed overrides, then the values Optuna suggests), runs end to end in
`<output>/trial_NNNN`, and reports the sweep's objectives. Constraints go to Optuna, so its Pareto
front holds feasible trials only. Workers that share a storage URL share the study.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import signal
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import optuna
import sqlalchemy.exc
from omegaconf import DictConfig
from optuna.trial import TrialState

from .config import ConfigError, build, check_range, store_base, to_plain
from .pareto import REFERENCE_ATTR, Report, value
from .serving import check_registered_name, log_model_into_run, register
from .sweep import Sweep, load_sweep
from .teacher import Teachers, load_model_config, resolve_source
from .tracking import create_parent_run, finish_parent_run, flatten, tracking_uri
from .trial import TrialConfig, check_against_teacher, measure_uncompressed, result_metrics, run_trial

if TYPE_CHECKING:
    from .tasks.base import Task

log = logging.getLogger(__name__)

# Heartbeats, fail_stale_trials and metric names have been "experimental" since Optuna 2.9 / 3.2; the
# study relies on them on purpose, so their warning would only repeat itself on every run.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class StudyFailed(Exception):
    """The study ended with no complete trial: the command fails, naming the trials' errors."""


DEFAULT_STORAGE = Path("sweeps") / "optuna.db"
PARENT_ATTR = "mlflow_parent_run_id"
SPEEDUP = "speedup"  # a trial's throughput over the teacher's reference (fp32, eager): the same on any CPU
TRIAL_ATTRS = (
    "throughput",
    SPEEDUP,
    "latency_p50_ms",
    "latency_p90_ms",
    "model_mb",
    "sparsity",
    "mlflow_run_id",
    "mlflow_model_uri",
    "backend",  # how the trial was measured, hence how its model serves
    "batch_size",
    "threads",
)
SAMPLERS = ("tpe", "nsga2")


@dataclass
class SearchConfig:
    sweep: str = "squad"  # sweeps/NAME.yaml, or a path to a sweep file
    study_name: str = "default"  # the study in the storage; the same name resumes it
    n_trials: int = 4  # complete trials the study aims for; a worker gives up after as many failures in a row
    timeout: float | None = None  # seconds: no new trial starts after this; null: no limit
    sampler: str = "tpe"  # tpe (Optuna's multi-objective default) | nsga2
    seed: int | None = 0  # sampler seed; null: a different search each run
    startup_trials: int = 4  # random trials before TPE models the results (NSGA-II: population size)
    storage: str | None = None  # SQLAlchemy URL shared by workers; null: sqlite:///sweeps/optuna.db
    heartbeat_interval: int = 30  # seconds between a running trial's heartbeats
    grace_period: int = 120  # a running trial silent this long belongs to a dead worker: failed
    latency_budget_ms: float | None = None  # name the best trial whose p90 latency fits; null: no budget
    references: bool = True  # measure the uncompressed teacher once per study (plot reference points)

    def validate(self, key: str) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"{key}.sampler={self.sampler!r} is unknown; allowed: {', '.join(SAMPLERS)}")
        check_range(f"{key}.n_trials", self.n_trials, 1)
        check_range(f"{key}.startup_trials", self.startup_trials, 2)
        check_range(f"{key}.heartbeat_interval", self.heartbeat_interval, 1)
        check_range(f"{key}.grace_period", self.grace_period, self.heartbeat_interval, low_open=True)
        check_range(f"{key}.timeout", self.timeout, 0, low_open=True)
        check_range(f"{key}.latency_budget_ms", self.latency_budget_ms, 0, low_open=True)


store_base("search", SearchConfig())


def storage_url(config: SearchConfig) -> str:
    if config.storage:
        return config.storage
    DEFAULT_STORAGE.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_STORAGE.resolve()}"


def open_storage(config: SearchConfig) -> optuna.storages.RDBStorage:
    """The study database, with heartbeats so a dead worker's running trial is marked failed."""
    url = storage_url(config)
    try:
        # Workers started together race to create the tables of an empty database: on PostgreSQL the
        # loser's CREATE TABLE fails once the winner commits (IntegrityError on pg_type's unique index,
        # or ProgrammingError "relation already exists"). The tables exist by then: open it again.
        for attempt in range(3):
            try:
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=config.heartbeat_interval,
                    grace_period=config.grace_period,
                    engine_kwargs={"pool_pre_ping": True},
                )
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                if attempt == 2:
                    raise
                time.sleep(1.0)
    except Exception as error:
        raise ConfigError(
            f"search.storage={_redacted(url)!r} cannot be opened ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); allowed: a reachable "
            "SQLAlchemy URL such as sqlite:///sweeps/optuna.db or postgresql+psycopg://USER:PASSWORD@HOST/DB"
        ) from None


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':')[0]}:***@{host}"


def make_sampler(config: SearchConfig, worker_salt: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler; `worker_salt` gives a worker joining or resuming a study its own random stream, so
    it does not propose again what the study's first worker proposed."""
    seed = None if config.seed is None else config.seed + worker_salt
    if config.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=config.startup_trials, seed=seed)
    return optuna.samplers.TPESampler(n_startup_trials=config.startup_trials, seed=seed)


def open_study(config: SearchConfig, sweep: Sweep) -> tuple[optuna.Study, bool]:
    """(study, created): the first worker creates the study, later ones and reruns load it."""
    storage = open_storage(config)
    directions = [o.direction for o in sweep.objectives]
    try:
        study = optuna.create_study(
            storage=storage, study_name=config.study_name, sampler=make_sampler(config), directions=directions
        )
        study.set_metric_names([o.name for o in sweep.objectives])
        for point in sweep.queued():  # the sweep's first trials; the sampler fills in the keys they omit
            study.enqueue_trial(point, skip_if_exists=True)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        salt = os.getpid() + 7919 * len(
            storage.get_all_trials(storage.get_study_id_from_name(config.study_name))
        )
        study = optuna.load_study(
            study_name=config.study_name, storage=storage, sampler=make_sampler(config, salt)
        )
    names = study.metric_names or [o.name for o in sweep.objectives]
    if [d.name.lower() for d in study.directions] != directions or names != [
        o.name for o in sweep.objectives
    ]:
        raise ConfigError(
            f"search.study_name={config.study_name!r} already exists with objectives {names} "
            f"({[d.name.lower() for d in study.directions]}); the sweep asks for "
            f"{[(o.name, o.direction) for o in sweep.objectives]}. Use another study_name."
        )
    return study, False


class Study:
    """One worker's part of a study: composes, runs and reports trials until the study is done."""

    def __init__(
        self,
        cfg: DictConfig,
        overrides: list[str],
        output_dir: Path,
        compose: Callable[[list[str]], DictConfig],
    ) -> None:
        self.config = build(SearchConfig, to_plain(cfg.search), "search")
        self.base = TrialConfig.from_hydra(cfg)  # the command line's trial, validated before any work
        self.overrides = [o for o in overrides if not o.startswith("search.")]
        self.output_dir = output_dir
        self.compose = compose
        self.sweep = load_sweep(self.config.sweep)
        self.teachers = Teachers()
        self.interrupted = False  # set by Ctrl-C

    def check(self) -> None:
        """Every error a sweep can make, found before any trial runs."""
        from .tasks import make_task

        if SPEEDUP in self.sweep.metrics and not self.config.references:
            raise ConfigError(
                f"sweep {self.sweep.path} uses {SPEEDUP}, a trial's throughput over the teacher's reference, "
                "but search.references=false measures no reference: set it true, or constrain throughput"
            )
        self.sweep.check_metrics(study_metrics(make_task(self.base.task), self.config.references))
        check_against_teacher(self.base, load_model_config(resolve_source(self.base.teacher.model)))
        self.sweep.check_keys(lambda extra: TrialConfig.from_hydra(self.compose([*self.overrides, *extra])))

    def run(self) -> Report:
        self.check()
        study, created = open_study(self.config, self.sweep)
        if created:  # one worker checks (and so first opens the MLflow store); the others find its study
            self._check_registered_name()
        parent = self._parent_run(study, created)
        log.info(
            "study %r in %s: %d trial(s) already complete",
            study.study_name,
            _redacted(storage_url(self.config)),
            _count(study, TrialState.COMPLETE),
        )
        alone = created or not _count(study, TrialState.RUNNING)  # a fresh study, or one being resumed
        if self.config.references and alone and REFERENCE_ATTR not in study.user_attrs:
            references = measure_uncompressed(
                self.compose(self.overrides),
                self.output_dir / "reference",
                {"teacher": "eager", "uncompressed": self.base.runtime.backend},
                self.teachers,
            )
            study.set_user_attr(REFERENCE_ATTR, references)
        try:
            with self._interruptible():
                self._optimize(study, parent)
        except KeyboardInterrupt:
            log.warning(
                "interrupted: the running trial is marked failed; %d complete trial(s) kept",
                _count(study, TrialState.COMPLETE),
            )
            finish_parent_run(self.base.tracking, parent, "KILLED")
            raise
        report = Report.from_study(study, self.config.latency_budget_ms)
        report.write(self.output_dir)
        # the last worker standing finishes the parent run; its report then covers every trial
        running = _count(study, TrialState.RUNNING)
        failed = not report.complete and not running
        status = "FAILED" if failed else "RUNNING" if running else "FINISHED"
        files, summary = report.files(self.output_dir), report.summary()
        try:
            if status == "FINISHED":
                self._publish(report)
        except Exception:
            finish_parent_run(self.base.tracking, parent, "FAILED", files, summary)
            raise
        finish_parent_run(self.base.tracking, parent, status, files, summary)
        if failed:
            raise StudyFailed(failure_summary(study))
        return report

    def _check_registered_name(self) -> None:
        """A registered name that already serves another task stops the study before any trial."""
        tracking = self.base.tracking
        if tracking.enabled and tracking.log_models != "none" and tracking.registered_model:
            mlflow.set_tracking_uri(tracking_uri(tracking))
            check_registered_name(tracking.registered_model, self.base.task.name)

    def _publish(self, report: Report) -> None:
        """The study's pick as an MLflow model (logged now unless its trial logged it) and, when
        `tracking.registered_model` names one, a new version of that registered model."""
        tracking = self.base.tracking
        best = report.best()
        if not tracking.enabled or tracking.log_models == "none":
            return
        if best is None:
            if tracking.registered_model:
                log.warning("nothing registered as %s: %s", tracking.registered_model, _why_no_pick(report))
            return
        from .tasks import make_task

        attrs = best.user_attrs
        mlflow.set_tracking_uri(tracking_uri(tracking))
        uri = attrs["mlflow_model_uri"] or log_model_into_run(
            attrs["mlflow_run_id"], Path(attrs["artifact"]), make_task(self.base.task), attrs
        )
        if tracking.registered_model:
            metrics = {name: value(best, name, report.metric_names) for name in report.columns}
            register(uri, tracking.registered_model, self.base.task.name, metrics, best.number)

    @contextlib.contextmanager
    def _interruptible(self) -> Iterator[None]:
        """Ctrl-C raises KeyboardInterrupt (Optuna marks the running trial failed) and is remembered:
        an interrupt that lands where Python drops exceptions (a garbage-collector callback) still stops
        the study once the running trial is done."""

        def on_interrupt(signum: int, frame: Any) -> None:
            self.interrupted = True
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, on_interrupt)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _parent_run(self, study: optuna.Study, created: bool) -> str | None:
        """The study's MLflow parent run: made by the worker that created the study, found by the others."""
        tracking = self.base.tracking
        if not tracking.enabled:
            return None
        if created:
            params = {**flatten({"search": asdict(self.config)}), "sweep.file": str(self.sweep.path)}
            run_id = create_parent_run(tracking, self.config.study_name, params)
            study.set_user_attr(PARENT_ATTR, run_id)
            study.set_user_attr("mlflow_tracking_uri", tracking_uri(tracking))
            return run_id
        return _wait_for_attr(study, PARENT_ATTR)

    def _optimize(self, study: optuna.Study, parent: str | None) -> None:
        """Run trials until the study holds n_trials complete ones (other workers' running trials
        count as pending, so workers do not overshoot), the timeout passes, or n_trials of this
        worker's trials in a row have failed (a broken setup must not loop forever)."""
        failed = 0
        deadline = time.monotonic() + self.config.timeout if self.config.timeout else None
        while failed < self.config.n_trials and (deadline is None or time.monotonic() < deadline):
            if self.interrupted:
                raise KeyboardInterrupt
            optuna.storages.fail_stale_trials(study)
            if _count(study, TrialState.COMPLETE) + _count(study, TrialState.RUNNING) >= self.config.n_trials:
                break
            states: list[TrialState] = []
            study.optimize(
                lambda trial: self._trial(trial, parent),
                n_trials=1,
                catch=(Exception,),
                callbacks=[lambda _, trial, states=states: states.append(trial.state)],
            )
            failed = failed + 1 if states == [TrialState.FAIL] else 0

    def _trial(self, trial: optuna.Trial, parent: str | None) -> list[float]:
        suggested = self.sweep.suggest(trial)
        trial.set_user_attr("overrides", suggested)
        output_dir = self.output_dir / f"trial_{trial.number:04d}"
        trial.set_user_attr("output_dir", str(output_dir.resolve()))
        _fresh_compiler()
        try:
            run_name = f"tracking.run_name='{self.config.study_name} trial {trial.number}'"
            cfg = self.compose([*self.overrides, *self.sweep.fixed, *suggested, run_name])
            tags = {"fastcpu.study": self.config.study_name, "fastcpu.trial": str(trial.number)}
            result = run_trial(cfg, output_dir, teachers=self.teachers, parent_run_id=parent, tags=tags)
        except Exception as error:
            trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:2000])
            raise
        result[SPEEDUP] = _speedup(result, trial.study.user_attrs.get(REFERENCE_ATTR, {}))
        for name in TRIAL_ATTRS:
            trial.set_user_attr(name, result[name])
        trial.set_user_attr("artifact", result["artifact"])
        for constraint in self.sweep.constraints:
            trial.set_constraint(constraint.text, constraint.violation(result))
        return [float(result[o.name]) for o in self.sweep.objectives]


def _fresh_compiler() -> None:
    """Each trial compiles a new model: drop the previous graphs so dynamo's per-function cache
    limit is never reached (past it, a trial would silently be measured in eager mode)."""
    import torch

    torch._dynamo.reset()
    gc.collect()


def study_metrics(task: Task, references: bool) -> set[str]:
    """What a study's trials report: a trial's numbers, and its speedup where the study measures the
    teacher's reference."""
    return result_metrics(task) | ({SPEEDUP} if references else set())


def _speedup(result: dict[str, Any], references: dict[str, dict[str, Any]]) -> float:
    """Throughput over the teacher's reference; NaN (so a constraint on it fails) without a reference."""
    teacher = references.get("teacher")
    if not teacher:
        log.warning("no teacher reference in the study yet: this trial's %s is unknown", SPEEDUP)
        return math.nan
    return result["throughput"] / teacher["throughput"]


def failure_summary(study: optuna.Study, shown: int = 3) -> str:
    """One line: how many trials failed and their errors, the most common first."""
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    unknown = "no error recorded (its worker died)"
    errors = Counter(" ".join(t.user_attrs.get("error", unknown).split())[:300] for t in failed)
    listed = "; ".join(f"{count}x {error}" for error, count in errors.most_common(shown))
    more = f"; and {len(errors) - shown} other error(s)" if len(errors) > shown else ""
    return f"study {study.study_name!r}: no trial completed; {len(failed)} failed" + (
        f": {listed}{more}" if failed else " (the timeout passed first)"
    )


def _why_no_pick(report: Report) -> str:
    """Why a finished study has no pick, and the knob that would give it one."""
    if not report.front:
        return "no complete trial meets the sweep's constraints (see the trials above)"
    fastest = min(value(t, "latency_p90_ms", report.metric_names) for t in report.front)
    return (
        f"no front trial's p90 latency fits {report.latency_budget_ms:g} ms (the fastest: {fastest:.1f} ms);"
        " raise search.latency_budget_ms to pick one"
    )


def _count(study: optuna.Study, state: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))


def _wait_for_attr(study: optuna.Study, name: str, timeout: float = 120.0) -> Any:
    """A value the study's creator is about to set (another worker may have created it a moment ago)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = optuna.load_study(study_name=study.study_name, storage=study._storage).user_attrs.get(name)
        if value is not None:
            return value
        time.sleep(0.5)
    raise ConfigError(
        f"study {study.study_name!r} has no {name} after {timeout:.0f} s; is its creator alive?"
    )
