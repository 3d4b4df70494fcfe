"""The `quantization` config group: the numeric scheme the deployed student runs in.

A scheme is a config dataclass whose `weights` says how the artifact stores the weights (int8 per
output channel, bf16 or fp32), registered with its `Method`: post-training schemes leave training alone;
`qat_int8` trains through fake int8 rounding once its `start` step is reached. The runtime reads the
scheme from the artifact's manifest and calibrates static activation ranges on the samples the artifact
carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fastcpu_runtime import quantize_per_channel
from fastcpu_runtime.architectures import encoder_linears

from .config import Registry, check_range
from .methods import Method

SCHEMES: Registry = Registry("quantization", discriminator="scheme")


@dataclass
class NoQuantization:
    scheme: str = "none"  # fp32 weights and compute
    weights: ClassVar[str] = "fp32"


@dataclass
class Bf16:
    scheme: str = "bf16"  # bf16 weights and compute (AVX-512 BF16 / AMX on recent x86)
    weights: ClassVar[str] = "bf16"


@dataclass
class DynamicInt8:
    scheme: str = "dynamic_int8"  # int8 weights per channel; activation ranges measured per batch at run time
    weights: ClassVar[str] = "int8"


@dataclass
class StaticInt8:
    scheme: str = "static_int8"  # int8 weights per channel, activation ranges fixed by calibration
    weights: ClassVar[str] = "int8"
    calibration_samples: int = 128  # training features shipped in the artifact for calibration

    def validate(self, key: str) -> None:
        check_range(f"{key}.calibration_samples", self.calibration_samples, 1)


@dataclass
class QatInt8(StaticInt8):
    scheme: str = "qat_int8"  # static int8, trained with fake-quantized weights and activations
    start: float = 0.0  # fraction of training after which rounding is on (pruning's `end`: the frozen masks)

    def validate(self, key: str) -> None:
        super().validate(key)
        check_range(f"{key}.start", self.start, 0.0, 1.0)


class FakeQuantLinear(nn.Linear):
    """A Linear that trains through int8 rounding: per-channel symmetric weights, per-tensor uint8
    activations with a moving-average range, straight-through gradients (the ops' own)."""

    momentum = 0.01

    def __init__(self, source: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight, self.bias = source.weight, source.bias  # shared: state dict keys stay the same
        device = source.weight.device
        self.register_buffer("input_min", torch.tensor(0.0, device=device), persistent=False)
        self.register_buffer("input_max", torch.tensor(0.0, device=device), persistent=False)
        self.register_buffer("initialised", torch.tensor(False, device=device), persistent=False)
        self.rounding = True  # False: observe the input range only, compute in float

    def _observe(self, x: torch.Tensor) -> None:
        low, high = x.detach().min().float(), x.detach().max().float()
        if not self.initialised:
            self.input_min.copy_(low), self.input_max.copy_(high), self.initialised.fill_(True)
        else:
            self.input_min.lerp_(low, self.momentum), self.input_max.lerp_(high, self.momentum)

    def _fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._observe(x)
        low, high = torch.clamp(self.input_min, max=0.0), torch.clamp(self.input_max, min=0.0)
        scale = torch.clamp((high - low) / 255.0, min=1e-8)
        zero_point = torch.clamp(torch.round(-low / scale), 0, 255).int()
        return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero_point, 0, 255).to(x.dtype)

    def _fake_quant_weight(self) -> torch.Tensor:
        scale = self.weight.detach().abs().amax(dim=1).clamp(min=1e-8) / 127.0
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(self.weight, scale, zero_point, 0, -127, 127)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rounding:
            if self.training:
                self._observe(x)
            return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)
        weight = self._fake_quant_weight().to(x.dtype)
        return nn.functional.linear(self._fake_quant_input(x), weight, self.bias)


@SCHEMES.register("none", NoQuantization)
@SCHEMES.register("bf16", Bf16)
@SCHEMES.register("dynamic_int8", DynamicInt8)
@SCHEMES.register("static_int8", StaticInt8)
class PostTrainingQuantization(Method):
    """Post-training schemes: the student trains in floating point; export quantizes it."""

    def __init__(self, config, total_steps: int) -> None:
        self.config = config
        self.total_steps = total_steps


@SCHEMES.register("qat_int8", QatInt8)
class QuantizationAwareTraining(PostTrainingQuantization):
    """Every encoder Linear trains through int8 rounding from the `start` step on; finalize swaps the
    plain Linears back (same parameters) and reports the activation ranges learned."""

    config: QatInt8

    def prepare(self, model: nn.Module) -> None:
        self.fake_quant = {}
        for name, linear in encoder_linears(model).items():
            owner, _, attr = name.rpartition(".")
            self.fake_quant[name] = FakeQuantLinear(linear)
            setattr(model.get_submodule(owner), attr, self.fake_quant[name])
        self.before_step(0)

    def before_step(self, step: int) -> None:
        rounding = step >= round(self.config.start * self.total_steps)
        for module in self.fake_quant.values():
            module.rounding = rounding

    def finalize(self, model: nn.Module) -> dict:
        ranges = {}
        for name, module in self.fake_quant.items():
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight, plain.bias = module.weight, module.bias
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, plain)
            ranges[name] = [module.input_min.item(), module.input_max.item()]
        return {"activation_ranges": ranges}


def make_quantizer(config, total_steps: int) -> Method:
    """The Method registered for this config's scheme."""
    return SCHEMES.create(config, total_steps=total_steps)


def calibration_samples(config) -> int:
    """How many input samples the artifact must carry for static activation calibration."""
    return getattr(config, "calibration_samples", 0)


def export_state_dict(config, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The artifact's tensors and the manifest's `quantization` entry for this scheme."""
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    if config.weights == "bf16":
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    quantized = list(encoder_linears(model)) if config.weights == "int8" else []
    for name in quantized:
        state[f"{name}.weight"], state[f"{name}.weight_scale"] = quantize_per_channel(state[f"{name}.weight"])
    return state, {"scheme": config.scheme, "modules": quantized}
