"""The `sparse` backend: an int8 artifact's quantized Linears on the 4x1 block-sparse VNNI kernel.

Everything else (embeddings, attention, LayerNorm, GELU, the activation quantization itself) stays
PyTorch and is compiled by inductor with freezing around the kernel, which is registered as the custom op
`fastcpu::sparse_linear` so dynamo sees one opaque node instead of breaking the graph.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..artifact import INT8_SCHEMES
from ..errors import BackendError
from ..kernels.sparse import PackedWeight, kernel_path, load_extension, pack_linear
from ..modeling import fast_attention
from .native import calibration_batches, compile_frozen, have_compiler, positional_model, widen
from .registry import Runner, register_backend

if TYPE_CHECKING:
    from ..artifact import Artifact

_X86 = ("x86_64", "amd64", "i386", "i686")
_UINT8_MAX = 255
_BLOCK = 4


def sparse_available() -> bool:
    """The kernel is x86 SIMD code built on first use, so it needs an x86 CPU and a C++ compiler."""
    return platform.machine().lower() in _X86 and have_compiler()


# ------------------------------------------------------------------------------------------- custom op


@torch.library.custom_op("fastcpu::sparse_linear", mutates_args=())
def sparse_linear_op(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero_point: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    values: torch.Tensor,
    row_sums: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """float32 [n, out] = dequant(x uint8 [n, in]) @ dequant(W)^T + bias, W given as its 4x1 packing.

    Every argument is a tensor (custom ops cannot take a PackedWeight); the activation scale and zero point
    are 0-d tensors so a dynamically computed pair stays inside the compiled graph (no .item() there).
    """
    return load_extension().sparse_linear(
        x.contiguous(),
        float(x_scale),
        int(x_zero_point),
        row_ptr,
        col_idx,
        values,
        row_sums,
        weight_scale,
        bias,
        weight_scale.shape[0],
        kernel_path(),
    )


@sparse_linear_op.register_fake
def _sparse_linear_fake(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero_point: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    values: torch.Tensor,
    row_sums: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """Shape-only version for tracing: one float32 row per activation row, one column per output."""
    return x.new_empty((x.shape[0], weight_scale.shape[0]), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- module


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine uint8 (scale, zero point) covering [lo, hi] widened to include 0, so exact zeros (padding,
    ReLU/GELU tails) quantize exactly. Tensor ops only, so the dynamic scheme compiles into the graph."""
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    scale = ((hi - lo) / _UINT8_MAX).clamp(min=torch.finfo(torch.float32).eps)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, _UINT8_MAX)
    return scale.to(torch.float32), zero_point.to(torch.float32)


def quantize_uint8(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """x -> uint8 the way PT2E's quantize_per_tensor does (multiply by 1/scale, round, shift, clamp)."""
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, 0, _UINT8_MAX).to(torch.uint8)


class SparseInt8Linear(nn.Module):
    """Drop-in for an nn.Linear whose int8 weight runs on the block-sparse kernel.

    The packed weight lives in buffers so freezing turns it into graph constants. `x_range` fixes the
    activation qparams (static schemes); None computes them from each call's input (dynamic).
    """

    def __init__(
        self,
        packed: PackedWeight,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        x_range: tuple[float, float] | None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_scale.shape[0], packed.in_features
        # the kernel works on whole 4-row blocks (pack_linear pads zero rows): slice them off after the call
        pad = packed.out_features - self.out_features
        if not 0 <= pad < _BLOCK:
            raise BackendError(
                f"packed weight has {packed.out_features} rows for {self.out_features} outputs"
                f" (expected {self.out_features + -self.out_features % _BLOCK})"
            )
        scale = torch.cat([weight_scale.float(), weight_scale.new_ones(pad, dtype=torch.float32)])
        full_bias = torch.zeros(packed.out_features)
        if bias is not None:
            full_bias[: self.out_features] = bias.detach().float()
        self.packed = packed
        for name, tensor in packed.to_dict().items():
            if name != "shape":
                self.register_buffer(name, tensor)
        self.register_buffer("weight_scale", scale.contiguous())
        self.register_buffer("bias", full_bias)
        self.dynamic = x_range is None
        if x_range is not None:
            x_scale, x_zero_point = qparams_from_range(torch.tensor(x_range[0]), torch.tensor(x_range[1]))
            self.register_buffer("x_scale", x_scale)
            self.register_buffer("x_zero_point", x_zero_point)

    def extra_repr(self) -> str:
        kind = "dynamic" if self.dynamic else "static"
        return f"{self.in_features}, {self.out_features}, {kind}, density={self.packed.density:.2f}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.dynamic:
            lo, hi = torch.aminmax(rows)
            x_scale, x_zero_point = qparams_from_range(lo, hi)
        else:
            x_scale, x_zero_point = self.x_scale, self.x_zero_point
        y = torch.ops.fastcpu.sparse_linear(
            quantize_uint8(rows, x_scale, x_zero_point),
            x_scale,
            x_zero_point,
            self.row_ptr,
            self.col_idx,
            self.values,
            self.row_sums,
            self.weight_scale,
            self.bias,
        )
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        return y.reshape(*x.shape[:-1], self.out_features)


# --------------------------------------------------------------------------------------------- backend


@register_backend("sparse", available=sparse_available)
def sparse(artifact: Artifact, batch_size: int, seq_len: int) -> Runner:
    """Run the int8 weights exactly as stored (no requantization), in the packing the artifact carries
    (written at export) or packed here; then compile the whole model."""
    if artifact.scheme not in INT8_SCHEMES:
        raise BackendError(
            f"backend sparse needs an int8 artifact (one of {list(INT8_SCHEMES)}); {artifact.path} has"
            f" scheme {artifact.scheme!r}. Use eager or native, or re-export with int8 quantization"
        )
    modules = artifact.quantized_modules
    if not modules:
        raise BackendError(f"{artifact.path}: scheme {artifact.scheme} but quantization.modules is empty")
    model = positional_model(artifact, torch.float32, fast_attention())
    dynamic = artifact.scheme == "dynamic_int8"
    ranges = None if dynamic else artifact.activation_ranges
    if ranges is None and not dynamic:
        ranges = observe_input_ranges(model, modules, artifact, batch_size, seq_len)
    packed = artifact.packed_weights()
    replaced = replace_linears(model.model, artifact.state_dict(), modules, ranges, packed)
    return Runner(compile_frozen(model), _describe(artifact, replaced, packed_at_export=packed is not None))


def observe_input_ranges(
    model: nn.Module, modules: list[str], artifact: Artifact, batch_size: int, seq_len: int
) -> dict[str, tuple[float, float]]:
    """Min/max of each listed Linear's input over the calibration batches, run through the fp32 model.

    Fixed once here, so the session gives identical results on every call (unlike dynamic qparams)."""
    batches = calibration_batches(artifact, batch_size, seq_len)
    ranges: dict[str, tuple[float, float]] = {}
    hooks = [
        model.model.get_submodule(name).register_forward_pre_hook(_range_hook(ranges, name))
        for name in modules
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                model(*batch)
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


def _range_hook(ranges: dict[str, tuple[float, float]], name: str) -> Callable[..., None]:
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        widen(ranges, name, *(float(v) for v in torch.aminmax(args[0].detach())))

    return hook


def replace_linears(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    modules: list[str],
    ranges: dict[str, tuple[float, float]] | None,
    packed: dict[str, PackedWeight] | None = None,
) -> list[SparseInt8Linear]:
    """Swap each listed nn.Linear (paths inside the Hugging Face model) for a SparseInt8Linear, using the
    artifact's stored packing where given and packing the stored int8 weight otherwise."""
    replaced = []
    for name in modules:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise BackendError(f"quantized module {name} is a {type(linear).__name__}, not an nn.Linear")
        x_range = None if ranges is None else ranges[name]
        weight = packed[name] if packed else pack_linear(state[f"{name}.weight"])
        if weight.in_features != state[f"{name}.weight"].shape[1]:
            raise BackendError(
                f"{name}: packed weight has {weight.in_features} inputs, the stored weight"
                f" {state[f'{name}.weight'].shape[1]}; re-export the artifact"
            )
        new = SparseInt8Linear(weight, state[f"{name}.weight_scale"], linear.bias, x_range)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        replaced.append(new)
    return replaced


def _describe(artifact: Artifact, replaced: list[SparseInt8Linear], packed_at_export: bool) -> str:
    """Name the scheme, kernel path and the work left after pruning (stored blocks / dense blocks)."""
    dense = sum(m.packed.out_features * m.in_features for m in replaced)
    stored = sum(m.packed.density * m.packed.out_features * m.in_features for m in replaced)
    kind = "dynamic" if artifact.scheme == "dynamic_int8" else "static"
    if artifact.activation_ranges is not None and kind == "static":
        kind = "static (ranges learned in training)"
    path = kernel_path()
    packing = "packed at export" if packed_at_export else "packed at load"
    return (
        f"sparse {kind} int8 ({len(replaced)} Linears on the 4x1 block-sparse {path} kernel, {packing},"
        f" block density {stored / dense:.0%}; rest inductor, freezing)"
    )


__all__ = [
    "SparseInt8Linear",
    "observe_input_ranges",
    "qparams_from_range",
    "quantize_uint8",
    "replace_linears",
    "sparse_available",
    "sparse_linear_op",
]
