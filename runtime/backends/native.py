"""PyTorch's own CPU path: torch.compile (inductor, freezing), and PT2E int8 with X86InductorQuantizer.

Graphs are compiled for the session's fixed shape; the session pads every call to it so nothing recompiles.
"""

from __future__ import annotations

import dataclasses
import itertools
import platform
import shutil
import types
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..artifact import INT8_SCHEMES
from ..cpu import int8_dot_product
from ..errors import BackendError
from ..inputs import fit_rows, synthetic_batch
from ..modeling import PositionalModel, fast_attention
from ..quant import INT8_MAX
from .registry import Runner, register_backend

if TYPE_CHECKING:
    from ..artifact import Artifact


def have_compiler() -> bool:
    """Inductor generates C++; without a compiler torch.compile fails on first call."""
    return any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++"))


@register_backend("native", available=have_compiler)
def native(artifact: Artifact, batch_size: int, seq_len: int) -> Runner:
    scheme = artifact.scheme
    if scheme in INT8_SCHEMES:
        return _int8_runner(artifact, batch_size, seq_len)
    if scheme == "bf16":
        model = positional_model(artifact, torch.bfloat16, fast_attention())
    else:  # fp32 stays exact: the reference the compressed students are compared with
        model = positional_model(artifact, torch.float32)
    precision = "bf16" if scheme == "bf16" else "fp32"
    return Runner(compile_frozen(model), f"native {precision} (torch.compile, inductor, freezing)")


def positional_model(artifact: Artifact, dtype: torch.dtype, attention: str = "sdpa") -> PositionalModel:
    model = artifact.build_model(dtype, attention)
    return PositionalModel(model, artifact.input_names, artifact.output_names).eval()


def compile_frozen(model: Callable[..., Any], *, skip_guards: bool = True) -> Callable[..., Any]:
    """torch.compile with inductor freezing (weights folded as constants, int8 weight prepacking).

    Freezing must be patched into the global inductor config: torch.compile(options={"freezing": True})
    does not reach the freezing pass in torch 2.13, and the int8 graph then fails on qlinear_prepack.
    The patch wraps every call, not just the first, so even an unexpected recompile stays frozen.
    After the first call (which compiles), calls skip dynamo's guard evaluation (`skip_guards`): a Session
    calls with one shape and dtype, so only the guards that tell compiled models apart are needed, and
    dynamo keeps those.
    """
    import torch._inductor.config as inductor_config

    compiled = torch.compile(_with_own_code(model), dynamic=False)
    warm = False

    def call(skip: bool, tensors: tuple[torch.Tensor, ...]) -> Any:
        with inductor_config.patch(freezing=True), torch.compiler.set_stance(skip_guard_eval_unsafe=skip):
            return compiled(*tensors)

    def run(*tensors: torch.Tensor) -> Any:
        nonlocal warm
        if warm and skip_guards:
            try:
                return call(True, tensors)
            except RuntimeError as err:  # the graph is gone (torch._dynamo.reset()): compile it again
                if "skip_guard_eval_unsafe" not in str(err):
                    raise
        out = call(False, tensors)
        warm = True
        return out

    return run


_compiled_models = itertools.count()


def _with_own_code(model: Callable[..., Any]) -> Callable[..., Any]:
    """`model(*tensors)` as a function with a code object of its own.

    dynamo keeps compiled graphs per code object, and every PositionalModel shares one `forward`: without
    this, each session's graph is one more entry there, the 9th in a process hits dynamo's recompile limit
    and silently runs eager, and each call walks the guards of the sessions compiled before it."""

    def call(*tensors: torch.Tensor) -> Any:
        return model(*tensors)

    code = call.__code__.replace(co_name=f"compiled_model_{next(_compiled_models)}")
    return types.FunctionType(code, call.__globals__, code.co_name, None, call.__closure__)


# ------------------------------------------------------------------------------------------------ int8


def _int8_runner(artifact: Artifact, batch_size: int, seq_len: int) -> Runner:
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        raise BackendError(
            f"native int8 needs an x86 CPU (X86InductorQuantizer); this is {platform.machine()}"
        )
    if not artifact.quantized_modules:
        raise BackendError(f"{artifact.path}: scheme {artifact.scheme} but quantization.modules is empty")
    dynamic = artifact.scheme == "dynamic_int8"
    ranges = None if dynamic else artifact.activation_ranges
    calibration = None if dynamic or ranges else calibration_batches(artifact, batch_size, seq_len)
    model = positional_model(artifact, torch.float32, fast_attention())
    example = tuple(synthetic_batch(artifact.input_names, batch_size, seq_len, artifact.vocab_size).values())
    converted = quantize_pt2e_model(model, example, artifact.quantized_modules, dynamic, calibration, ranges)
    kind = "dynamic" if dynamic else "static"
    if ranges:
        kind = "static (ranges learned in training)"
    source = " from QAT weights" if artifact.scheme == "qat_int8" else ""
    activations = "" if int8_dot_product() else ", 7-bit activations: no VNNI"
    return Runner(
        compile_frozen(converted),
        f"native {kind} int8{source} (PT2E X86InductorQuantizer{activations}, inductor, freezing)",
    )


def calibration_batches(artifact: Artifact, batch_size: int, seq_len: int) -> list[tuple[torch.Tensor, ...]]:
    """The artifact's calibration rows at the session shape; a short last batch wraps around to stay full."""
    data = artifact.calibration()
    if not data:
        raise BackendError(
            f"{artifact.path}: scheme {artifact.scheme} needs calibration.safetensors for static int8;"
            " re-export with calibration data"
        )
    data = fit_rows({n: data[n] for n in artifact.input_names if n in data}, seq_len, artifact.pad_token_id)
    rows = next(iter(data.values())).shape[0]
    if rows == 0:
        raise BackendError(
            f"{artifact.path}: calibration.safetensors holds no rows; re-export with calibration data"
        )
    defaults = synthetic_batch(artifact.input_names, 1, seq_len, artifact.vocab_size)
    batches = []
    for start in range(0, rows, batch_size):
        index = torch.arange(start, start + batch_size) % rows
        batches.append(
            tuple(
                data[n][index] if n in data else defaults[n].expand(batch_size, -1)
                for n in artifact.input_names
            )
        )
    return batches


def quantize_pt2e_model(
    model: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    module_names: list[str],
    dynamic: bool,
    calibration: list[tuple[torch.Tensor, ...]] | None,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> torch.nn.Module:
    """Export, annotate only `module_names` (paths inside the Hugging Face model), calibrate (or pin the
    given input `ranges` of those modules), convert."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    with torch.no_grad():
        exported = torch.export.export(model, example, strict=False).module()
        _tag_linear_sources(exported)
        prepared = prepare_pt2e(exported, _quantizer(module_names, dynamic))
        for batch in calibration or [example]:
            prepared(*batch)
        if ranges:
            pin_input_ranges(prepared, ranges)
        converted = convert_pt2e(prepared)
    expected = {f"model.{name}" for name in module_names}
    actual = quantized_linears(converted)
    if actual != expected:
        missing, extra = sorted(expected - actual)[:5], sorted(actual - expected)[:5]
        raise BackendError(
            f"PT2E quantized {len(actual)} Linear modules instead of the {len(expected)} listed;"
            f" not quantized: {missing}, unexpectedly quantized: {extra}"
        )
    return converted


def pin_input_ranges(prepared: torch.fx.GraphModule, ranges: dict[str, tuple[float, float]]) -> None:
    """Replace the observer of each listed Linear's input with a min/max observer fixed at its range.

    Linears fed by the same tensor (query, key, value) share one observer in PT2E; it gets the union of
    their ranges, which QAT learns alike since they see the same inputs."""
    from torchao.quantization.pt2e.observer import MinMaxObserver

    pinned: dict[str, tuple[float, float]] = {}
    for node, path in linear_nodes(prepared):
        name, observer = path.removeprefix("model."), node.args[0]
        if name in ranges and getattr(observer, "op", None) == "call_module":
            widen(pinned, observer.target, *ranges[name])
    for target, (lo, hi) in pinned.items():
        old = prepared.get_submodule(target)
        fixed = MinMaxObserver(
            dtype=old.dtype, qscheme=old.qscheme, quant_min=old.quant_min, quant_max=old.quant_max
        )
        fixed.min_val, fixed.max_val = torch.tensor(lo), torch.tensor(hi)
        setattr(prepared, target, fixed)


def _tag_linear_sources(graph_module: torch.fx.GraphModule) -> None:
    """Give each op of an nn.Linear the `source_fn_stack` that X86InductorQuantizer finds Linears by.

    Non-strict export records no `source_fn_stack`. Recent torch (2.13 here) has get_source_partitions fall
    back to `nn_module_stack`; torch 2.8 (the IPEX environment) has no such fallback, so its quantizer sees
    no Linear and annotates nothing. This writes what the fallback reads (the innermost module's path and
    class), so both versions partition alike; nodes that already carry a stack are left alone.
    """
    linear = f"{torch.nn.Linear.__module__}.{torch.nn.Linear.__qualname__}"
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack or "source_fn_stack" in node.meta:
            continue
        path, cls = list(stack.values())[-1]
        if cls is torch.nn.Linear or cls == linear:
            node.meta["source_fn_stack"] = [(path, torch.nn.Linear)]


def widen(ranges: dict[str, tuple[float, float]], key: str, lo: float, hi: float) -> None:
    """Grow `ranges[key]` (min, max) to cover [lo, hi]; a new key starts there."""
    old = ranges.get(key, (lo, hi))
    ranges[key] = (min(old[0], lo), max(old[1], hi))


def linear_nodes(graph_module: torch.fx.GraphModule) -> Iterator[tuple[torch.fx.Node, str]]:
    """Each linear op of the graph with the module path of the nn.Linear it came from."""
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.target is torch.ops.aten.linear.default and stack:
            yield node, list(stack.values())[-1][0]


def quantized_linears(graph_module: torch.fx.GraphModule) -> set[str]:
    """Module paths of the linear ops whose weight comes from an int8 dequantize, read off the graph."""
    found = set()
    for node, path in linear_nodes(graph_module):
        weight = node.args[1]
        if getattr(weight, "op", None) == "call_function" and "dequantize" in str(weight.target):
            found.add(path)
    return found


def _quantizer(module_names: list[str], dynamic: bool) -> Any:
    """Per-module-name configs and no global one, so unlisted Linears (e.g. the QA head) stay fp32."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    # Without VNNI, oneDNN's int16 pair sums saturate on full-range uint8 activations (cosine to eager 0.967
    # on an AVX2 CPU): activations then take 7 bits, as the quantizer advises for such CPUs.
    reduce_range = not int8_dot_product()
    config = get_default_x86_inductor_quantization_config(is_dynamic=dynamic, reduce_range=reduce_range)
    # Weight range [-127, 127] makes the observer's scale max|w| / 127, the artifact's convention, so the
    # compiled graph runs exactly the stored int8 weights and scales. The default [-128, 127] range would
    # use max|w| / 127.5 and shrink every quantized weight by 0.4%.
    config = dataclasses.replace(config, weight=dataclasses.replace(config.weight, quant_min=-INT8_MAX))
    quantizer = X86InductorQuantizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the quantizer only *warns* when it drops a config; make that loud
        for name in module_names:
            quantizer.set_module_name_qconfig(f"model.{name}", config)
    return quantizer
