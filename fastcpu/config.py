"""Typed, validated configs built from Hydra's composed tree.

Hydra composes YAML; this module turns each group's node into a dataclass, rejecting unknown keys,
wrong types and out-of-range values with one message that names the key and what is allowed. Every
config group has one owning module that declares its dataclasses (and, for compression methods, a
`Registry` mapping a name to a config class and its implementation).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, Union

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is invalid. The message names the key and what is allowed."""


def _package_path(package: str, relative: str = "") -> str:
    """Resolver `${pkg:NAME,REL}`: a path inside an installed package (data shipped with it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"${{pkg:{package},...}}: package {package!r} is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))) / relative)


OmegaConf.register_new_resolver("pkg", _package_path, replace=True)


def store_base(group: str, defaults: Any) -> None:
    """Register a group's dataclass defaults as the option `base` of `conf/<group>/`: option files start
    with `defaults: [base, _self_]` and state only what differs, so every default lives in one place, the
    dataclass, while every key still exists for `key=value` overrides."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group=group, name="base", node=dataclasses.asdict(defaults))


T = TypeVar("T")


def to_plain(node: Any) -> Any:
    """Resolve an OmegaConf node into plain dicts and lists (other values pass through)."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def build(cls: type[T], node: Mapping | None, key: str) -> T:
    """Build dataclass `cls` from `node`, checking keys and types, then run its `validate(key)`."""
    node = to_plain(node) or {}
    if not isinstance(node, Mapping):
        raise ConfigError(f"{key} must be a mapping of settings, got {node!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(node) - set(fields))
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {unknown}; allowed keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: coerce(value, hints[name], f"{key}.{name}") for name, value in node.items()}
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{key}: missing required key(s) {missing}")
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(key)
    return obj


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint (int, float, bool, str, Literal, Optional, list[...])."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key} must not be null")
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r} matches none of {hint}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        return [coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def check_range(
    key: str,
    value: float | None,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ConfigError unless low <= value <= high (or strict where `*_open`)."""
    if value is None:
        return
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ConfigError(f"{key}={value} is out of range; allowed: {left}{lo}, {hi}{right}")


class Registry(Generic[T]):
    """Maps a method name to its config dataclass and implementation, for one config group.

    Adding a method is adding a dataclass and a function or class decorated with `register`.
    """

    def __init__(self, group: str, discriminator: str = "name") -> None:
        self.group = group
        self.discriminator = discriminator
        self._entries: dict[str, tuple[type, Callable]] = {}

    def register(self, name: str, config_cls: type) -> Callable[[Callable], Callable]:
        def decorator(fn: Callable) -> Callable:
            self._entries[name] = (config_cls, fn)
            return fn

        return decorator

    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    def build(self, node: Mapping | None, key: str | None = None) -> Any:
        """Build the config object for the method named in `node[discriminator]`."""
        key = key or self.group
        node = dict(to_plain(node) or {})
        name = node.get(self.discriminator)
        if name not in self._entries:
            raise ConfigError(
                f"{key}.{self.discriminator}={name!r} is unknown; allowed: {', '.join(self.names)}"
            )
        return build(self._entries[name][0], node, key)

    def implementation(self, config: Any) -> Callable:
        """The function (or class) registered for this config object's method."""
        return self._entries[getattr(config, self.discriminator)][1]

    def create(self, config: Any, **context: Any) -> Any:
        """The registered implementation built for `config`: `implementation(config)(config, **context)`."""
        return self.implementation(config)(config, **context)
