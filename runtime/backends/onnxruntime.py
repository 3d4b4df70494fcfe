"""The `onnxruntime` backends: the artifact's fp32 model exported to ONNX and run by ONNX Runtime, the peer
baseline that the native and sparse backends are measured against.

`onnxruntime` follows the artifact's scheme: an int8 artifact gets ONNX Runtime's own dynamic int8
quantization (`quantize_dynamic`, per-channel symmetric QInt8 weights) of exactly the Linears the manifest
lists. `onnxruntime_fp32` always runs fp32, so one int8 artifact gives both baselines.

The model is exported with the torch.export-based ("dynamo") exporter, the default since torch 2.9: the
TorchScript exporter is deprecated and slated for removal, and both give ONNX Runtime the same fused graph.
It needs onnxscript, so that is part of the availability check.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..artifact import INT8_SCHEMES
from ..cpu import int8_dot_product
from ..errors import BackendError
from ..inputs import synthetic_batch
from .native import positional_model
from .registry import Runner, register_if_installed

if TYPE_CHECKING:
    from ..artifact import Artifact

INSTALL = "pip install onnxruntime onnxscript"
_REQUIRED = ("onnxruntime", "onnxscript")  # onnxscript: the dynamo ONNX exporter; it brings `onnx` along
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # node metadata: the module path of each exported op
_WRAPPER = "model."  # PositionalModel holds the Hugging Face model as `model`
_INT8_OPS = ("MatMulInteger", "DynamicQuantizeMatMul")


def missing_packages() -> list[str]:
    """find_spec only: cheap, and it never imports onnxruntime."""
    return [name for name in _REQUIRED if importlib.util.find_spec(name) is None]


# ---------------------------------------------------------------------------------------------- factories


def onnxruntime_backend(artifact: Artifact, batch_size: int, seq_len: int) -> Runner:
    """ONNX Runtime at the artifact's precision: dynamic int8 for the int8 schemes, fp32 otherwise."""
    return build_runner(artifact, batch_size, seq_len, int8=artifact.scheme in INT8_SCHEMES)


def onnxruntime_fp32_backend(artifact: Artifact, batch_size: int, seq_len: int) -> Runner:
    """ONNX Runtime fp32 whatever the scheme (int8 weights dequantized): the unquantized peer baseline."""
    return build_runner(artifact, batch_size, seq_len, int8=False)


register_if_installed(
    {"onnxruntime": onnxruntime_backend, "onnxruntime_fp32": onnxruntime_fp32_backend},
    missing_packages(),
    INSTALL,
)


# ------------------------------------------------------------------------------------------------ runner


def build_runner(artifact: Artifact, batch_size: int, seq_len: int, *, int8: bool) -> Runner:
    """Export, optionally quantize, and open the ONNX Runtime session, all in a temporary directory: the
    artifact directory is checksummed, and the session holds everything in memory once created."""
    if int8 and not artifact.quantized_modules:
        raise BackendError(f"{artifact.path}: scheme {artifact.scheme} but quantization.modules is empty")
    with tempfile.TemporaryDirectory(prefix="fastcpu-onnx-") as tmp:
        model_path = export_onnx(artifact, batch_size, seq_len, Path(tmp) / "fp32.onnx")
        if int8:
            model_path = quantize_int8(model_path, Path(tmp) / "int8.onnx", artifact.quantized_modules)
        session = inference_session(model_path, torch.get_num_threads())
    return Runner(OrtRunner(session, artifact.input_names, artifact.output_names), describe(artifact, int8))


def describe(artifact: Artifact, int8: bool) -> str:
    import onnxruntime

    prefix = f"onnxruntime {onnxruntime.__version__}"
    if int8:
        source = "" if artifact.scheme == "dynamic_int8" else f"; artifact scheme {artifact.scheme}"
        return f"{prefix} dynamic int8 (per-channel{source})"
    if artifact.scheme == "bf16":
        # fp32, not an error: ONNX Runtime's x86 CPU provider has no bf16 MatMul, and the fp32 row on the
        # bf16-rounded weights is still the baseline the native bf16 session is compared with.
        return f"{prefix} fp32 (bf16 weights upcast)"
    if artifact.scheme in INT8_SCHEMES:
        return f"{prefix} fp32 (int8 weights dequantized)"
    return f"{prefix} fp32"


def export_onnx(artifact: Artifact, batch_size: int, seq_len: int, path: Path) -> Path:
    """The artifact's fp32 model as ONNX at the fixed session shape (no dynamic axes: the session pads)."""
    model = positional_model(artifact, torch.float32)
    example = tuple(synthetic_batch(artifact.input_names, batch_size, seq_len, artifact.vocab_size).values())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter deprecation chatter about torch internals
        torch.onnx.export(
            model,
            example,
            str(path),
            input_names=artifact.input_names,
            output_names=artifact.output_names,
            dynamo=True,  # torch.export-based; see the module docstring
            verbose=False,
        )
    return path


def quantize_int8(fp32_path: Path, int8_path: Path, modules: list[str]) -> Path:
    """ONNX Runtime dynamic int8 of the listed Linears only (unlisted ones, e.g. a QA head, stay fp32, as in
    the native backend). Symmetric per-channel QInt8 gives scale max|w| / 127, the artifact's convention, so
    the stored int8 weights come back exactly; except on CPUs without VNNI, where ONNX Runtime's u8 x s8
    kernels add product pairs in int16, which saturates: there the weights take 7 bits (`reduce_range`)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = linear_nodes(onnx.load(str(fp32_path), load_external_data=False), modules)
    with _quiet_preprocessing_hint():
        quantize_dynamic(
            fp32_path,
            int8_path,
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            reduce_range=not int8_dot_product(),  # see the docstring
        )
    quantized = count_int8_matmuls(onnx.load(str(int8_path), load_external_data=False))
    if quantized != len(nodes):
        raise BackendError(f"ONNX Runtime quantized {quantized} MatMuls instead of the {len(nodes)} listed")
    return int8_path


def linear_nodes(model: Any, modules: list[str]) -> list[str]:
    """Names of the MatMul nodes that compute the listed Linears, read off the exporter's name scopes."""
    initializers = {init.name for init in model.graph.initializer}
    by_module: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers:
            module = _module_path(node)
            if module is not None:
                by_module[module] = node.name
    missing = [name for name in modules if name not in by_module]
    if missing:
        raise BackendError(
            f"found no MatMul with a constant weight for {len(missing)} listed Linear(s), e.g. {missing[:3]};"
            f" the exporter wrote them another way (e.g. Gemm) or its {_NAME_SCOPES} metadata changed"
        )
    return [by_module[name] for name in modules]


def _module_path(node: Any) -> str | None:
    """The Hugging Face module path of a node: the innermost module scope (the last scope is the op)."""
    for prop in node.metadata_props:
        if prop.key == _NAME_SCOPES:
            scopes = ast.literal_eval(prop.value)
            if len(scopes) >= 2 and scopes[-2].startswith(_WRAPPER):
                return scopes[-2].removeprefix(_WRAPPER)
    return None


def count_int8_matmuls(model: Any) -> int:
    return sum(node.op_type in _INT8_OPS for node in model.graph.node)


@contextmanager
def _quiet_preprocessing_hint() -> Iterator[None]:
    """quantize_dynamic logs "consider pre-processing" on the root logger. Pre-processing would fuse and
    rename nodes before nodes_to_quantize is matched; the session's ORT_ENABLE_ALL fuses afterwards."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def inference_session(model_path: Path, threads: int) -> Any:
    """One inference stream: intra-op threads only, sequential execution, every graph optimization."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # threads spin while a run is on (its speed) but stop when it ends: left spinning, they took cores from
    # whatever ran next in the machine (the sparse kernel's batch-1 calls ran at half speed after them)
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


class OrtRunner:
    """`runner(*tensors in input_names order)` -> outputs in output_names order. Inputs the exporter dropped
    as unused are not fed; `session` stays reachable so its options can be inspected."""

    def __init__(self, session: Any, input_names: list[str], output_names: list[str]) -> None:
        self.session = session
        self.output_names = output_names
        graph_inputs = {arg.name for arg in session.get_inputs()}
        self._fed = [(index, name) for index, name in enumerate(input_names) if name in graph_inputs]

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {name: tensors[index].numpy() for index, name in self._fed}
        return tuple(torch.from_numpy(array) for array in self.session.run(self.output_names, feeds))
