"""Inference backends. Each lives in its own module and registers itself with `register_backend`."""

import importlib

from .registry import (
    BackendFactory,
    BackendSpec,
    Runner,
    available_backends,
    backend_refusal,
    broken_backends,
    build_runner,
    get_backend,
    mark_broken,
    register_backend,
    registered_backends,
)

# Each backend module registers itself on import. Imports are defensive: a backend whose module cannot
# import (missing extension, failed C++ build) is reported as broken instead of breaking the others.
_BUILTIN = ("eager", "native", "sparse", "onnxruntime", "openvino", "ipex")


def _load_builtin() -> None:
    for name in _BUILTIN:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ImportError as err:
            mark_broken(name, str(err))


_load_builtin()

__all__ = [
    "BackendFactory",
    "BackendSpec",
    "Runner",
    "available_backends",
    "backend_refusal",
    "broken_backends",
    "build_runner",
    "get_backend",
    "mark_broken",
    "register_backend",
    "registered_backends",
]
