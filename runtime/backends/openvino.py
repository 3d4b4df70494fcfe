"""The `openvino` backends: the artifact's model converted by OpenVINO and compiled for its CPU plugin, the
dense runtime a user of an Intel or AMD CPU would pick instead of fastcpu.

`openvino` follows the artifact's scheme: an int8 artifact is quantized by NNCF's post-training
quantization (static int8, the transformer preset) of exactly the Linears the manifest lists, calibrated
on the artifact's own calibration rows at the session shape; anything else runs at the
plugin's default inference precision (bf16 on a CPU with AVX-512 BF16 or AMX, else fp32).
`openvino_fp32` always runs fp32 (int8 weights dequantized, inference precision pinned to f32), so one
artifact gives both baselines. NNCF fits its own activation ranges: an int8 row's accuracy is OpenVINO's,
measured on the same rows as every other backend's.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from typing import TYPE_CHECKING, Any

import torch

from ..artifact import INT8_SCHEMES
from ..cpu import int8_dot_product
from ..errors import BackendError
from ..inputs import synthetic_batch
from .native import calibration_batches, positional_model
from .registry import Runner, register_if_installed

if TYPE_CHECKING:
    from ..artifact import Artifact

INSTALL = "pip install openvino nncf"
_REQUIRED = ("openvino", "nncf")
_LINEAR = ("__module.model.", "/aten::linear/MatMul")  # a converted Linear's node: prefix MODULE suffix


def missing_packages() -> list[str]:
    """find_spec only: cheap, and it never imports OpenVINO or NNCF."""
    return [name for name in _REQUIRED if importlib.util.find_spec(name) is None]


def openvino_backend(artifact: Artifact, batch_size: int, seq_len: int) -> Runner:
    """OpenVINO at the artifact's precision: NNCF static int8 for the int8 schemes, the default otherwise."""
    int8 = artifact.scheme in INT8_SCHEMES
    return build_runner(artifact, batch_size, seq_len, int8=int8, fp32=False)


def openvino_fp32_backend(artifact: Artifact, batch_size: int, seq_len: int) -> Runner:
    """OpenVINO fp32 whatever the scheme: the unquantized peer baseline."""
    return build_runner(artifact, batch_size, seq_len, int8=False, fp32=True)


register_if_installed(
    {"openvino": openvino_backend, "openvino_fp32": openvino_fp32_backend}, missing_packages(), INSTALL
)


def build_runner(artifact: Artifact, batch_size: int, seq_len: int, *, int8: bool, fp32: bool) -> Runner:
    """Convert at the fixed session shape, optionally quantize, and compile for the CPU plugin."""
    import openvino

    if int8 and not artifact.quantized_modules:
        raise BackendError(f"{artifact.path}: scheme {artifact.scheme} but quantization.modules is empty")
    model = convert(artifact, batch_size, seq_len)
    if int8:
        batches = calibration_batches(artifact, batch_size, seq_len)
        model = quantize_int8(model, batches, unlisted_linears(model, artifact.quantized_modules))
    config = {
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "NUM_STREAMS": 1,  # one inference stream: the same single-request setting as every other backend
        "PERFORMANCE_HINT": "LATENCY",
    }
    if fp32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = openvino.Core().compile_model(model, "CPU", config)
    return Runner(OpenVinoRunner(compiled), describe(artifact, compiled, int8))


def convert(artifact: Artifact, batch_size: int, seq_len: int) -> Any:
    """The artifact's fp32 model (int8 weights dequantized) as an OpenVINO model with static input shapes."""
    import openvino
    import transformers

    model = positional_model(artifact, torch.float32, "eager")  # eager attention traces to plain ops
    example = tuple(synthetic_batch(artifact.input_names, batch_size, seq_len, artifact.vocab_size).values())
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the tracer reads every attribute: `loss_function` warns
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer chatter about Python control flow on constant shapes
            converted = openvino.convert_model(model, example_input=example)
    finally:
        transformers.logging.set_verbosity(verbosity)
    for port, name in zip(converted.inputs, artifact.input_names, strict=True):
        port.get_tensor().set_names({name})
    converted.reshape({name: [batch_size, seq_len] for name in artifact.input_names})
    return converted


def unlisted_linears(model: Any, modules: list[str]) -> list[str]:
    """The converted Linears (MatMul nodes named after their module) that the artifact keeps in float,
    e.g. a QA head, so that OpenVINO quantizes exactly the Linears the other int8 backends do."""
    found: dict[str, str] = {}
    for op in model.get_ops():
        name = op.get_friendly_name()
        if op.get_type_name() == "MatMul" and name.startswith(_LINEAR[0]) and name.endswith(_LINEAR[1]):
            found[name.removeprefix(_LINEAR[0]).removesuffix(_LINEAR[1])] = name
    missing = [module for module in modules if module not in found]
    if missing:
        raise BackendError(
            f"OpenVINO's converted model names no MatMul for {len(missing)} listed Linear(s), e.g."
            f" {missing[:3]}; its node naming ({_LINEAR[0]}MODULE{_LINEAR[1]}) changed"
        )
    return [node for module, node in found.items() if module not in modules]


def quantize_int8(model: Any, batches: list[tuple[torch.Tensor, ...]], keep_float: list[str]) -> Any:
    """NNCF post-training static int8 with the transformer preset (softmax, LayerNorm and the residual
    adds stay in float), calibrated on every calibration batch; the `keep_float` nodes are not quantized.

    SmoothQuant, on by default for transformers, is off: it rescales each weight column by its input's
    range, so the int8 weights would no longer be the artifact's (per-channel max|w| / 127, which
    quantizing the dequantized weights gives back exactly), and on the tests' tiny model it took the
    cosine to eager from 0.997 to 0.78."""
    import nncf

    logging.getLogger("nncf").setLevel(logging.WARNING)  # progress bars and per-step info
    dataset = nncf.Dataset([tuple(t.numpy() for t in batch) for batch in batches])
    no_smoothing = nncf.AdvancedSmoothQuantParameters(matmul=-1)
    return nncf.quantize(
        model,
        dataset,
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(batches),
        ignored_scope=nncf.IgnoredScope(names=keep_float),
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=no_smoothing, overflow_fix=_overflow_fix(nncf)
        ),
    )


def _overflow_fix(nncf: Any) -> Any:
    """Without VNNI the CPU plugin adds u8 x s8 product pairs in int16, which saturates: NNCF's overflow
    fix then gives every quantized layer's weights 7 bits (its default fixes the first layer only)."""
    return nncf.OverflowFix.FIRST_LAYER if int8_dot_product() else nncf.OverflowFix.ENABLE


def describe(artifact: Artifact, compiled: Any, int8: bool) -> str:
    import openvino

    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # f32, bf16
    prefix = f"openvino {openvino.get_version().split('-')[0]}"
    if int8:
        return f"{prefix} static int8 (NNCF PTQ, transformer preset, its own ranges, other ops {precision})"
    weights = " (int8 weights dequantized)" if artifact.scheme in INT8_SCHEMES else ""
    return f"{prefix} {precision}{weights}"


class OpenVinoRunner:
    """`runner(*tensors in input_names order)` -> output tensors in the model's output order."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        results = self.request.infer([t.numpy() for t in tensors])
        return tuple(torch.from_numpy(results[port].copy()) for port in self.compiled.outputs)
