"""Inference backends. Each lives in its own module and registers itself with `register_backend`."""

import importlib

from .registry import (
    BackendFactory,
    BackendSpec,
    Runner,
    available_backends,
    get_backend,
    mark_broken,
    register_backend,
    registered_backends,
)

# Optional backends are imported defensively: one that cannot import must not break the others.
_BUILTIN = ("eager", "native")

for _name in _BUILTIN:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ImportError as _err:
        mark_broken(_name, str(_err))

__all__ = [
    "BackendFactory",
    "BackendSpec",
    "Runner",
    "available_backends",
    "get_backend",
    "mark_broken",
    "register_backend",
    "registered_backends",
]
