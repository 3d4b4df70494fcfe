"""Sweep files (`sweeps/*.yaml`): the search space, objectives and constraints of a study.

A sweep names config keys the way Hydra overrides do: a dotted key (`pruning.sparsity`) sets a value,
a key that is a config group (`quantization`) picks one of its option files. Everything is checked
when the file is loaded, and again against the composed config before any trial runs, so a typo
costs one error message rather than a study of failed trials.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError

SWEEPS_DIR = Path(__file__).resolve().parent.parent / "sweeps"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
PARAM_FIELDS = {
    "float": {"type", "low", "high", "log"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}
DIRECTIONS = ("maximize", "minimize")
CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w/]*)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")
PLAIN_STRING = re.compile(r"^[A-Za-z_][\w\-./]*$")


def hydra_value(value: Any) -> str:
    """`value` written as Hydra override grammar reads it back (lists, nulls, quoted odd strings)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    if PLAIN_STRING.match(text) and text not in ("null", "true", "false"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def is_group(key: str) -> bool:
    """A key without dots that names a folder of conf/ picks an option file of that group."""
    return "." not in key and (CONFIG_DIR / key).is_dir()


@dataclass(frozen=True)
class Param:
    """One searched key and its distribution."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: int | None = None
    choices: tuple = ()

    def suggest(self, trial: Any) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log)
        if self.type == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        # Optuna stores scalar choices only: a list choice travels as its JSON text
        label = trial.suggest_categorical(self.key, [_label(c) for c in self.choices])
        return next(c for c in self.choices if _label(c) == label)

    def extremes(self) -> list[Any]:
        """The values that test the whole space: both ends of a range, every choice."""
        if self.type == "categorical":
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]

    def override(self, value: Any) -> str:
        return f"{self.key}={hydra_value(value)}"

    def checked(self, value: Any, where: str) -> Any:
        """`value` if this param allows it (a list choice as the tuple it is stored as), else an error
        naming what the param allows."""
        if self.type == "categorical":
            if _frozen(value) not in self.choices:
                allowed = ", ".join(json.dumps(c) for c in self.choices)
                raise ConfigError(f"{where}={value!r} is not a choice; allowed: {allowed}")
            return _frozen(value)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not self.low <= value <= self.high or (self.type == "int" and value != int(value)):
            raise ConfigError(
                f"{where}={value!r}; allowed: a{'n int' if self.type == 'int' else ' number'} "
                f"in [{self.low}, {self.high}]"
            )
        return value


def _label(choice: Any) -> Any:
    return choice if choice is None or isinstance(choice, (bool, int, float, str)) else json.dumps(choice)


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str


@dataclass(frozen=True)
class Constraint:
    """`metric <= bound` or `metric >= bound`, reported to Optuna as a violation (<= 0 is feasible)."""

    metric: str
    op: str
    bound: float

    @property
    def text(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"

    def violation(self, result: Mapping[str, Any]) -> float:
        value = float(result[self.metric])
        return value - self.bound if self.op == "<=" else self.bound - value


@dataclass(frozen=True)
class Sweep:
    path: Path
    params: tuple[Param, ...]
    fixed: tuple[str, ...]  # overrides every trial of the sweep gets
    objectives: tuple[Objective, ...]
    constraints: tuple[Constraint, ...]
    enqueue: tuple[dict[str, Any], ...] = ()  # first trials: {searched key: config value}

    def suggest(self, trial: Any) -> list[str]:
        """The overrides Optuna picks for `trial`, one per searched key."""
        return [p.override(p.suggest(trial)) for p in self.params]

    def queued(self) -> list[dict[str, Any]]:
        """The enqueued points as Optuna's params (a list choice as its JSON text, as `suggest` asks)."""
        return [{key: _label(value) for key, value in point.items()} for point in self.enqueue]

    @property
    def metrics(self) -> set[str]:
        return {o.name for o in self.objectives} | {c.metric for c in self.constraints}

    def check_metrics(self, produced: set[str]) -> None:
        unknown = sorted(self.metrics - produced)
        if unknown:
            raise ConfigError(
                f"sweep {self.path}: no trial produces {unknown}; allowed: {', '.join(sorted(produced))}"
            )

    def check_keys(self, compose: Callable[[list[str]], Any]) -> None:
        """Compose a config for every extreme value of every param (plus the fixed overrides), so an
        unknown key, a missing option file or an out-of-range bound fails now, naming the key."""
        try:
            compose(list(self.fixed))
        except Exception as error:
            raise ConfigError(f"sweep {self.path}: fixed: {_first_line(error)}") from error
        for param in self.params:
            for value in param.extremes():
                try:
                    compose([*self.fixed, param.override(value)])
                except Exception as error:
                    raise ConfigError(
                        f"sweep {self.path}: params.{param.key}={value!r}: {_first_line(error)}"
                    ) from error
        by_key = {p.key: p for p in self.params}
        for index, point in enumerate(self.enqueue):
            overrides = [by_key[key].override(value) for key, value in point.items()]
            try:
                compose([*self.fixed, *overrides])
            except Exception as error:
                raise ConfigError(f"sweep {self.path}: enqueue[{index}]: {_first_line(error)}") from error


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def sweep_path(name: str) -> Path:
    """A sweep is a name in sweeps/ (`squad` -> sweeps/squad.yaml) or a path to a YAML file."""
    path = Path(name).expanduser()
    if path.suffix not in (".yaml", ".yml"):
        path = SWEEPS_DIR / f"{name}.yaml"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
        raise ConfigError(f"search.sweep={name!r}: no file {path}; available in sweeps/: {available}")
    return path


def load_sweep(name: str) -> Sweep:
    path = sweep_path(name)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"sweep {path} is not valid YAML: {error}") from error
    _check_keys(tree, {"params", "fixed", "enqueue", "objectives", "constraints"}, f"sweep {path}")
    params = tree.get("params") or {}
    if not isinstance(params, Mapping) or not params:
        raise ConfigError(f"sweep {path}: params must map at least one config key to a distribution")
    parsed = tuple(_param(key, spec, f"sweep {path}: params.{key}") for key, spec in params.items())
    return Sweep(
        path=path,
        params=parsed,
        fixed=tuple(f"{key}={hydra_value(v)}" for key, v in _mapping(tree, "fixed", path).items()),
        objectives=_objectives(_mapping(tree, "objectives", path), path),
        constraints=tuple(_constraint(text, path) for text in tree.get("constraints") or []),
        enqueue=_enqueue(tree.get("enqueue") or [], {p.key: p for p in parsed}, path),
    )


def _enqueue(points: Any, params: Mapping[str, Param], path: Path) -> tuple[dict[str, Any], ...]:
    """The sweep's first trials: each a mapping from searched keys to values those params allow (keys
    left out are sampled)."""
    if not isinstance(points, list):
        raise ConfigError(f"sweep {path}: enqueue must be a list of mappings, got {points!r}")
    checked = []
    for index, point in enumerate(points):
        where = f"sweep {path}: enqueue[{index}]"
        _check_keys(point, set(params), where)
        checked.append({key: params[key].checked(value, f"{where}.{key}") for key, value in point.items()})
    return tuple(checked)


def _check_keys(tree: Any, allowed: set[str], where: str) -> None:
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {tree!r}")
    unknown = sorted(set(tree) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(sorted(allowed))}")


def _mapping(tree: Mapping, key: str, path: Path) -> Mapping:
    value = tree.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"sweep {path}: {key} must be a mapping, got {value!r}")
    return value


def _param(key: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, Mapping) or spec.get("type") not in PARAM_FIELDS:
        raise ConfigError(f"{where}: needs type: one of {', '.join(PARAM_FIELDS)}; got {spec!r}")
    _check_keys(spec, PARAM_FIELDS[spec["type"]], where)
    if spec["type"] == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list, got {choices!r}")
        return Param(key, "categorical", choices=tuple(_frozen(c) for c in choices))
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise ConfigError(f"{where}: low and high must be numbers, got low={low!r} high={high!r}")
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ConfigError(f"{where}: empty range [{low}, {high}]; allowed: finite low < high")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{where}: log: true needs low > 0, got low={low}")
    if spec["type"] == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}: an int range needs integer bounds, got [{low}, {high}]")
    return Param(key, spec["type"], low=low, high=high, log=log, step=spec.get("step"))


def _frozen(value: Any) -> Any:
    """Choices must be hashable (a frozen dataclass field): lists become tuples, written back as lists."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def _objectives(spec: Mapping, path: Path) -> tuple[Objective, ...]:
    if not spec:
        raise ConfigError(f"sweep {path}: objectives must name at least one result, e.g. f1: maximize")
    for name, direction in spec.items():
        if direction not in DIRECTIONS:
            raise ConfigError(
                f"sweep {path}: objectives.{name}={direction!r}; allowed: {', '.join(DIRECTIONS)}"
            )
    return tuple(Objective(str(name), direction) for name, direction in spec.items())


def _constraint(text: Any, path: Path) -> Constraint:
    match = CONSTRAINT.match(str(text))
    if not match:
        raise ConfigError(
            f"sweep {path}: constraint {text!r} is not 'METRIC <= NUMBER' or 'METRIC >= NUMBER'"
        )
    metric, op, bound = match.groups()
    try:
        return Constraint(metric, op, float(bound))
    except ValueError:
        raise ConfigError(f"sweep {path}: constraint {text!r}: {bound!r} is not a number") from None
