"""Backend registry: each backend is a factory registered under a name, so new ones (ipex, onnxruntime,
sparse) plug in as their own modules without touching the session code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import BackendError

if TYPE_CHECKING:
    from ..artifact import Artifact


@dataclass(frozen=True)
class Runner:
    """What a factory returns: `fn(*tensors in input_names order)` -> outputs in output_names order
    (a tuple, or a mapping such as a Hugging Face ModelOutput), plus a human description."""

    fn: Callable[..., Any]
    description: str


BackendFactory = Callable[["Artifact", int, int], "Runner | Callable[..., Any]"]
Refusal = Callable[[str, str], "str | None"]  # (model_type, scheme) -> why the backend cannot run it, or None


@dataclass(frozen=True)
class BackendSpec:
    name: str
    factory: BackendFactory
    is_available: Callable[[], bool]
    refuses: Refusal


_REGISTRY: dict[str, BackendSpec] = {}
_BROKEN: dict[str, str] = {}  # backend module name -> why importing it failed


def register_backend(
    name: str, *, available: Callable[[], bool] | None = None, refuses: Refusal | None = None
) -> Callable[[BackendFactory], BackendFactory]:
    """Register `factory(artifact, batch_size, seq_len) -> Runner | callable` under `name`.

    `available` is a cheap check (e.g. "is the extension importable?") that must not import heavy libraries;
    `refuses(model_type, scheme)` says why the backend cannot run such an artifact (None: it can), so a
    trial can be refused before it trains and a session before it builds.
    """

    def decorator(factory: BackendFactory) -> BackendFactory:
        if name in _REGISTRY:
            raise ValueError(f"backend {name!r} is already registered")
        spec = BackendSpec(name, factory, available or (lambda: True), refuses or (lambda *_: None))
        _REGISTRY[name] = spec
        return factory

    return decorator


def register_if_installed(factories: dict[str, BackendFactory], missing: list[str], install: str) -> None:
    """Register a backend family whose packages are optional; without them (`missing`), mark each name
    broken with the install hint, so requesting one says what to install."""
    for name, factory in factories.items():
        if missing:
            mark_broken(name, f"{', '.join(missing)} not installed; {install}")
        else:
            register_backend(name)(factory)


def mark_broken(name: str, reason: str) -> None:
    """Record a backend whose module failed to import, so errors can say why it is missing."""
    _BROKEN[name] = reason


def _usable(spec: BackendSpec) -> bool:
    try:
        return bool(spec.is_available())
    except Exception:
        return False


def available_backends() -> list[str]:
    """Names of the registered backends that can run on this machine."""
    return sorted(name for name, spec in _REGISTRY.items() if _usable(spec))


def broken_backends() -> dict[str, str]:
    """Backends whose module could not load, with why (e.g. an install hint): config validation shows it."""
    return dict(_BROKEN)


def backend_refusal(name: str, model_type: str, scheme: str) -> str | None:
    """One sentence on why backend `name` cannot run a `model_type` artifact in `scheme`, naming the
    backends that can; None when it can (or is not registered: get_backend says so)."""
    spec = _REGISTRY.get(name)
    why = spec.refuses(model_type, scheme) if spec else None
    if why is None:
        return None
    others = [b for b in available_backends() if b != name and not _REGISTRY[b].refuses(model_type, scheme)]
    can = ", ".join(others)
    return f"backend {name!r} cannot run {model_type} models in {scheme}: {why}; backends that can: {can}"


def build_runner(name: str, artifact: Artifact, batch_size: int, seq_len: int) -> Runner:
    """The backend's runner for the artifact at a fixed shape (a bare callable is wrapped with its name)."""
    refusal = backend_refusal(name, artifact.model_type, artifact.scheme)
    if refusal:
        raise BackendError(refusal)
    runner = get_backend(name)(artifact, batch_size, seq_len)
    return runner if isinstance(runner, Runner) else Runner(runner, name)


def registered_backends() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str) -> BackendFactory:
    """The factory for `name`, or a BackendError that names it and lists what is available."""
    spec = _REGISTRY.get(name)
    available = ", ".join(available_backends()) or "none"
    if spec is None:
        why = f" (its module failed to import: {_BROKEN[name]})" if name in _BROKEN else ""
        raise BackendError(f"unknown backend {name!r}{why}; available backends: {available}")
    if not _usable(spec):
        raise BackendError(f"backend {name!r} is not usable on this machine; available backends: {available}")
    return spec.factory
