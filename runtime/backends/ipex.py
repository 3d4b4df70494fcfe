"""The `ipex` backend: Intel Extension for PyTorch, traced with torch.jit and frozen at the session shape.

IPEX 2.8 is its last release and pins torch 2.8, so it lives in its own virtual environment (README, "The
IPEX environment"); without it the backend is marked broken with that install hint. Int8 artifacts get
IPEX's own quantization with its default qconfig (static for static_int8 / qat_int8, calibrated on the
artifact's calibration rows; dynamic for dynamic_int8), which covers every Linear IPEX supports, the
unlisted ones (e.g. a QA head) included. bf16 runs ipex.optimize(bfloat16) under autocast; fp32 runs
ipex.optimize. TorchScript tracing plus freezing is IPEX's documented int8 path and fuses its kernels.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..artifact import INT8_SCHEMES
from ..cpu import fast_bf16, int8_dot_product
from ..errors import BackendError
from ..inputs import synthetic_batch
from .native import calibration_batches, positional_model
from .registry import Runner, mark_broken, register_backend

if TYPE_CHECKING:
    from ..artifact import Artifact

NAME = "ipex"
INSTALL = (
    "it needs torch 2.8 in its own environment: python3 -m venv ipexenv && ipexenv/bin/pip install"
    ' -c constraints/ipex.txt -e ".[dev,ipex]" (README: The IPEX environment)'
)
_STATIC_SCHEMES = ("static_int8", "qat_int8")
_WARMUP = 2  # IPEX's TorchScript fuser rewrites the frozen graph during its first calls


def ipex_installed() -> bool:
    """find_spec only: importing IPEX takes seconds and overrides torch kernels."""
    return importlib.util.find_spec("intel_extension_for_pytorch") is not None


def _register() -> None:
    """Register the backend, or mark it broken so requesting it says how to get IPEX."""
    if not ipex_installed():
        mark_broken(NAME, f"intel_extension_for_pytorch not installed; {INSTALL}")
        return
    register_backend(NAME, available=ipex_installed, refuses=refuses)(ipex_backend)


def refuses(model_type: str, scheme: str) -> str | None:
    """IPEX 2.8's static int8 graph of DeBERTa-v2 (and v3) kills the process with a segmentation fault at
    its first call (measured 2026-12-07 on an AVX2 CPU, either activation range); its dynamic int8 and
    fp32 run, so only that pair is refused."""
    if model_type == "deberta-v2" and scheme in _STATIC_SCHEMES:
        return "IPEX 2.8's static int8 graph of this family crashes the process (a segmentation fault)"
    return None


# ---------------------------------------------------------------------------------------------- factory


def ipex_backend(artifact: Artifact, batch_size: int, seq_len: int) -> Runner:
    """IPEX at the artifact's precision, traced and frozen for (batch_size, seq_len)."""
    import intel_extension_for_pytorch as ipex

    example = trace_example(artifact, batch_size, seq_len)
    bf16 = artifact.scheme == "bf16"
    if artifact.scheme in INT8_SCHEMES:
        model, precision = _int8_model(artifact, example, batch_size, seq_len)
    else:
        if bf16 and not fast_bf16():
            raise BackendError(
                "ipex bf16 packs its weights with AVX-512 (avx512bw, avx512vl, avx512dq) or AVX-NE-CONVERT,"
                " which this CPU lacks; run the bf16 artifact on native or eager"
            )
        dtype = torch.bfloat16 if bf16 else torch.float32
        model = ipex.optimize(positional_model(artifact, torch.float32), dtype=dtype)
        precision = "bf16" if bf16 else "fp32"
    return Runner(
        trace_frozen(model, example, autocast=bf16), f"ipex {_version(ipex)} {precision} (torch.jit, freeze)"
    )


def _version(ipex: Any) -> str:
    return str(ipex.__version__).split("+")[0]


def trace_example(artifact: Artifact, batch_size: int, seq_len: int) -> tuple[torch.Tensor, ...]:
    """A synthetic batch whose last row is half padding: a trace of an all-ones mask could record the
    model's "no padding, skip the mask" shortcut and then ignore padding forever."""
    batch = synthetic_batch(artifact.input_names, batch_size, seq_len, artifact.vocab_size)
    if "attention_mask" in batch and seq_len > 1:
        batch["attention_mask"][-1, seq_len // 2 :] = 0
    return tuple(batch.values())


# ------------------------------------------------------------------------------------------------ int8


def _int8_model(
    artifact: Artifact, example: tuple[torch.Tensor, ...], batch_size: int, seq_len: int
) -> tuple[torch.nn.Module, str]:
    """(IPEX-quantized model, precision label); static schemes are calibrated on the artifact's rows."""
    from intel_extension_for_pytorch.quantization import (
        convert,
        default_dynamic_qconfig_mapping,
        default_static_qconfig_mapping,
        prepare,
    )

    if not artifact.quantized_modules:
        raise BackendError(f"{artifact.path}: scheme {artifact.scheme} but quantization.modules is empty")
    static = artifact.scheme in _STATIC_SCHEMES
    calibration = calibration_batches(artifact, batch_size, seq_len) if static else []
    mapping = default_static_qconfig_mapping if static else default_dynamic_qconfig_mapping
    if static and not int8_dot_product():
        mapping = _seven_bit_activations(mapping)
    model = positional_model(artifact, torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notices raised inside IPEX
        # bn_folding off: a Transformer has no BatchNorm, and the attempt only logs a failure
        prepared = prepare(model, mapping, example_inputs=example, inplace=False, bn_folding=False)
        for batch in calibration:
            prepared(*batch)
        converted = convert(prepared)
    # IPEX's observers cover more ops than the Linears QAT trained, so its ranges are calibrated, not learned
    source = " from QAT weights, ranges calibrated" if artifact.scheme == "qat_int8" else ""
    return converted, f"{'static' if static else 'dynamic'} int8{source}"


def _seven_bit_activations(mapping: Any) -> Any:
    """IPEX's static mapping with activations observed into [0, 127]: without VNNI its u8 x s8 kernels add
    product pairs in int16, which full-range uint8 saturates (cosine to eager 0.965 on an AVX2 CPU)."""
    from torch.ao.quantization import HistogramObserver, QConfigMapping

    qconfig = mapping.global_qconfig
    seven_bits = HistogramObserver.with_args(qscheme=torch.per_tensor_affine, reduce_range=True)
    return QConfigMapping().set_global(qconfig._replace(activation=seven_bits))


# ----------------------------------------------------------------------------------------------- trace


def trace_frozen(
    model: torch.nn.Module, example: tuple[torch.Tensor, ...], *, autocast: bool = False
) -> Callable[..., Any]:
    """torch.jit.trace + freeze at the example's shape, warmed up so the first timed call is not a fusion
    pass; `autocast` traces (and runs) under CPU bf16 autocast, as ipex.optimize(bfloat16) expects."""
    with torch.no_grad(), _autocast(autocast), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python values in the Hugging Face model
        traced = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False, strict=False))
        for _ in range(_WARMUP):
            traced(*example)

    def run(*tensors: torch.Tensor) -> Any:
        with torch.no_grad(), _autocast(autocast):
            return traced(*tensors)

    return run


def _autocast(enabled: bool) -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


_register()
