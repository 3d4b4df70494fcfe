"""The `sparse` backend: an int8 artifact's quantized Linears on the 4x1 block-sparse VNNI kernel.

Everything else (embeddings, attention, LayerNorm, GELU, the activation quantization itself) stays
PyTorch and is compiled by inductor with freezing around the kernel, which is registered as the custom op
`fastcpu::sparse_linear` so dynamo sees one opaque node instead of breaking the graph.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..architectures import family_layer_map, transformer_layers
from ..artifact import INT8_SCHEMES
from ..errors import BackendError
from ..kernels.sparse import PackedWeight, kernel_path, load_extension, pack_linear, stack_rows
from ..modeling import fast_attention
from .native import calibration_batches, compile_frozen, have_compiler, positional_model, widen
from .registry import Runner, register_backend

if TYPE_CHECKING:
    from ..artifact import Artifact

_X86 = ("x86_64", "amd64", "i386", "i686")
_UINT8_MAX = 255
_BLOCK = 4
# The steps of the fused sparse encoder, in the order they were added: "qkv" runs a layer's query, key and
# value as one GEMM; "unguarded" calls the compiled graph without evaluating dynamo's guards; "gelu" applies
# the FFN's GELU and the second FFN Linear's input quantization in the first one's epilogue.
# FASTCPU_SPARSE_FUSION caps them, as FASTCPU_SPARSE_MAX_ISA caps the kernel's ISA, so a benchmark can
# measure what each step buys.
FUSION_STEPS = ("none", "qkv", "unguarded", "gelu")
FUSION_ENV = "FASTCPU_SPARSE_FUSION"


def sparse_available() -> bool:
    """The kernel is x86 SIMD code built on first use, so it needs an x86 CPU and a C++ compiler."""
    return platform.machine().lower() in _X86 and have_compiler()


def fusion_steps() -> tuple[str, ...]:
    """The fusion steps on: every one up to $FASTCPU_SPARSE_FUSION (default: all of them)."""
    cap = os.environ.get(FUSION_ENV, FUSION_STEPS[-1])
    if cap not in FUSION_STEPS:
        raise ValueError(f"{FUSION_ENV}={cap!r} is not a fusion step; allowed: {', '.join(FUSION_STEPS)}")
    return FUSION_STEPS[: FUSION_STEPS.index(cap) + 1]


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
    gelu_out_scale: torch.Tensor | None = None,
    gelu_out_zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 [n, out] = dequant(x uint8 [n, in]) @ dequant(W)^T + bias, W given as its 4x1 packing; with
    the gelu_out pair, uint8 quantize(GELU(that)) instead.

    Every argument is a tensor (custom ops cannot take a PackedWeight); the activation scale and zero point
    are 0-d tensors so a dynamically computed pair stays inside the compiled graph (no .item() there).
    """
    gelu_out = None if gelu_out_scale is None else (float(gelu_out_scale), int(gelu_out_zero_point))
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
        *(gelu_out or (0.0, 0)),
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
    gelu_out_scale: torch.Tensor | None = None,
    gelu_out_zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shape-only version for tracing: one row per activation row, one column per output."""
    dtype = torch.float32 if gelu_out_scale is None else torch.uint8
    return x.new_empty((x.shape[0], weight_scale.shape[0]), dtype=dtype)


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
    activation qparams (static schemes); None computes them from each call's input (dynamic). A uint8
    input is taken as already quantized with this Linear's qparams (by the previous one's epilogue).
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
        self.x_range = x_range
        # the next Linear's input qparams when this one's epilogue applies GELU and quantizes for it
        self.register_buffer("gelu_out_scale", None)
        self.register_buffer("gelu_out_zero_point", None)
        if x_range is not None:
            x_scale, x_zero_point = qparams_from_range(torch.tensor(x_range[0]), torch.tensor(x_range[1]))
            self.register_buffer("x_scale", x_scale)
            self.register_buffer("x_zero_point", x_zero_point)

    @property
    def dynamic(self) -> bool:
        """Activation qparams from each call's input (no fixed range)."""
        return self.x_range is None

    def extra_repr(self) -> str:
        kind = "dynamic" if self.dynamic else "static"
        gelu = ", then GELU to uint8" if self.gelu_out_scale is not None else ""
        return f"{self.in_features}, {self.out_features}, {kind}, density={self.packed.density:.2f}{gelu}"

    def emit_gelu_for(self, consumer: SparseInt8Linear) -> None:
        """Output uint8 GELU(y), quantized with `consumer`'s (static) input qparams, for it to read."""
        if consumer.dynamic:
            raise BackendError("a GELU epilogue needs the consuming Linear's static activation range")
        self.gelu_out_scale, self.gelu_out_zero_point = consumer.x_scale, consumer.x_zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if x.dtype == torch.uint8:
            x_scale, x_zero_point = self.x_scale, self.x_zero_point
        elif self.dynamic:
            lo, hi = torch.aminmax(rows)
            x_scale, x_zero_point = qparams_from_range(lo, hi)
        else:
            x_scale, x_zero_point = self.x_scale, self.x_zero_point
        y = torch.ops.fastcpu.sparse_linear(
            rows if x.dtype == torch.uint8 else quantize_uint8(rows, x_scale, x_zero_point),
            x_scale,
            x_zero_point,
            self.row_ptr,
            self.col_idx,
            self.values,
            self.row_sums,
            self.weight_scale,
            self.bias,
            self.gelu_out_scale,
            self.gelu_out_zero_point,
        )
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        return y.reshape(*x.shape[:-1], self.out_features)


def stack_linears(members: list[SparseInt8Linear]) -> SparseInt8Linear:
    """One SparseInt8Linear computing [y1, y2, ...] for Linears that read the same input; static ranges
    are joined (equal when observed on the same input; QAT learns them close)."""
    x_range = None
    if not members[0].dynamic:
        x_range = (min(m.x_range[0] for m in members), max(m.x_range[1] for m in members))
    return SparseInt8Linear(
        stack_rows([m.packed for m in members]),
        torch.cat([m.weight_scale[: m.out_features] for m in members]),
        torch.cat([m.bias[: m.out_features] for m in members]),
        x_range,
    )


class MergedQKVSelfAttention(nn.Module):
    """A BERT-family self-attention (BertSelfAttention's forward, encoder only) whose query, key and value
    run as one sparse GEMM: they read the same hidden states, so one activation quantization and one
    kernel call do the work of three."""

    def __init__(self, attention: nn.Module, members: list[SparseInt8Linear]) -> None:
        super().__init__()
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.bert.modeling_bert import eager_attention_forward

        self.qkv = stack_linears(members)
        self.widths = [m.out_features for m in members]
        self.config = attention.config
        self.is_causal = attention.is_causal
        self.head_size = attention.attention_head_size
        self.scaling = attention.scaling
        self.attend = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        self.train(attention.training)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        kwargs.pop("cache", None)  # always None in an encoder
        rows = hidden_states.shape[:-1]
        q, k, v = (
            t.reshape(*rows, -1, self.head_size).transpose(1, 2)
            for t in self.qkv(hidden_states).split(self.widths, dim=-1)
        )
        out, weights = self.attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return out.reshape(*rows, -1).contiguous(), weights


def merge_query_key_value(model: nn.Module) -> int:
    """Swap each BERT-family self-attention whose query, key and value all run on the sparse kernel (and
    fill whole 4-row blocks) for a MergedQKVSelfAttention; returns how many layers were merged."""
    lmap = family_layer_map(model.config.model_type)
    if lmap.bert_self_attention is None:
        return 0
    merged = 0
    for layer in transformer_layers(model):
        members = [layer.get_submodule(name) for name in lmap.attention_in]
        if not all(isinstance(m, SparseInt8Linear) and m.out_features % _BLOCK == 0 for m in members):
            continue
        parent, _, child = lmap.bert_self_attention.rpartition(".")
        attention = layer.get_submodule(lmap.bert_self_attention)
        setattr(layer.get_submodule(parent), child, MergedQKVSelfAttention(attention, members))
        merged += 1
    return merged


def is_erf_gelu(activation: nn.Module) -> bool:
    """GELU in its exact (erf) form, the one the kernel's epilogue computes."""
    from transformers.activations import GELUActivation

    if isinstance(activation, nn.GELU):
        return activation.approximate == "none"
    return isinstance(activation, GELUActivation) and activation.act is nn.functional.gelu


def fuse_ffn_gelu(model: nn.Module) -> int:
    """In each layer whose FFN Linears both run on the sparse kernel with a static range around an erf
    GELU, make the first emit uint8 GELU output for the second (the GELU module becomes Identity);
    returns how many layers were fused."""
    lmap = family_layer_map(model.config.model_type)
    if lmap.ffn_activation is None:
        return 0
    fused = 0
    for layer in transformer_layers(model):
        ffn_in, ffn_out = layer.get_submodule(lmap.ffn_in), layer.get_submodule(lmap.ffn_out)
        if not (
            isinstance(ffn_in, SparseInt8Linear)
            and isinstance(ffn_out, SparseInt8Linear)
            and not ffn_out.dynamic
            and is_erf_gelu(layer.get_submodule(lmap.ffn_activation))
        ):
            continue
        ffn_in.emit_gelu_for(ffn_out)
        parent, _, child = lmap.ffn_activation.rpartition(".")
        setattr(layer.get_submodule(parent), child, nn.Identity())
        fused += 1
    return fused


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
    steps = fusion_steps()
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
    merged = merge_query_key_value(model.model) if "qkv" in steps else 0
    gelu = fuse_ffn_gelu(model.model) if "gelu" in steps else 0
    description = _describe(artifact, replaced, packed is not None, merged_layers=merged, gelu_layers=gelu)
    return Runner(compile_frozen(model, skip_guards="unguarded" in steps), description)


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


def _describe(
    artifact: Artifact,
    replaced: list[SparseInt8Linear],
    packed_at_export: bool,
    merged_layers: int,
    gelu_layers: int,
) -> str:
    """Name the scheme, kernel path and the work left after pruning (stored blocks / dense blocks)."""
    dense = sum(m.packed.out_features * m.in_features for m in replaced)
    stored = sum(m.packed.density * m.packed.out_features * m.in_features for m in replaced)
    kind = "dynamic" if artifact.scheme == "dynamic_int8" else "static"
    if artifact.activation_ranges is not None and kind == "static":
        kind = "static (ranges learned in training)"
    path = kernel_path()
    packing = "packed at export" if packed_at_export else "packed at load"
    if merged_layers:
        packing += f", query/key/value as one GEMM in {merged_layers} layers"
    if gelu_layers:
        packing += f", GELU + requantize in the FFN's first GEMM in {gelu_layers} layers"
    return (
        f"sparse {kind} int8 ({len(replaced)} Linears on the 4x1 block-sparse {path} kernel, {packing},"
        f" block density {stored / dense:.0%}; rest inductor, freezing)"
    )


__all__ = [
    "FUSION_ENV",
    "FUSION_STEPS",
    "MergedQKVSelfAttention",
    "SparseInt8Linear",
    "fuse_ffn_gelu",
    "fusion_steps",
    "is_erf_gelu",
    "merge_query_key_value",
    "observe_input_ranges",
    "qparams_from_range",
    "quantize_uint8",
    "replace_linears",
    "sparse_available",
    "sparse_linear_op",
    "stack_linears",
]
