"""Turn an artifact's tensors back into a Hugging Face module with the shapes that were actually saved."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .architectures import sync_head_counts
from .artifact import SCALE_SUFFIX
from .cpu import cpu_flags, fast_bf16
from .errors import ArtifactError
from .quant import dequantize_per_channel

if TYPE_CHECKING:
    from .artifact import Artifact

_AUTO_CLASSES = {
    "question_answering": "AutoModelForQuestionAnswering",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
}


def build_model(artifact: Artifact, dtype: torch.dtype = torch.float32, attention: str = "sdpa") -> nn.Module:
    """Build the task model from config.json, then load the artifact's (dequantized) tensors into it.

    `attention` is a transformers attn_implementation: "sdpa", or one of fast_attention()'s."""
    model = _model_from_config(artifact, attention)
    state = dequantized_state_dict(artifact.state_dict(), artifact.quantized_modules)
    if resize_linears(model, state):
        sync_head_counts(model)
    _load_strict(model, state, artifact)
    return model.to(dtype).eval()


def _model_from_config(artifact: Artifact, attention: str) -> nn.Module:
    import transformers

    if attention in (BF16_ATTENTION, BF16_SDPA):
        _register_fast_attention()
    config = transformers.AutoConfig.for_model(**artifact.model_config)
    auto_class = getattr(transformers, _AUTO_CLASSES[artifact.head])
    model_class = auto_class._model_mapping[type(config)]
    return auto_class.from_config(config, attn_implementation=supported_attention(model_class, attention))


def supported_attention(model_class: type, wanted: str) -> str:
    """`wanted` where the model class can run it, else "eager": DeBERTa computes its disentangled
    attention itself and takes neither sdpa nor an attention function registered with transformers."""
    if wanted == "sdpa":
        return wanted if model_class._supports_sdpa else "eager"
    return wanted if wanted == "eager" or model_class._supports_attention_backend else "eager"


# ------------------------------------------------------------------------------------------- attention

BF16_ATTENTION = "fastcpu_bf16_matmul"
BF16_SDPA = "fastcpu_bf16_sdpa"


def fast_attention() -> str:
    """The attn_implementation of backends that already trade fp32 exactness for speed (int8, bf16).

    Measured per attention call (batch 8, 12 heads, seq 192, 2 threads): with AMX, PyTorch's fused CPU
    attention on bf16 inputs (BF16_SDPA) takes 2.7 ms, fp32 sdpa 4.4 ms and BF16_ATTENTION 9.7 ms, whose
    [b, h, s, s] scores go through memory. With AVX512-BF16 and no AMX (Zen 4), BF16_ATTENTION took about
    half of fp32 sdpa's time at seq 128. Without fast bf16, plain "sdpa"."""
    if "amx_bf16" in cpu_flags():
        return BF16_SDPA
    return BF16_ATTENTION if fast_bf16() else "sdpa"


def bf16_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    fused: bool,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Softmax(Q K^T) V on bf16 inputs with an fp32 softmax, output in the query's dtype; inference only
    (no dropout); `attention_mask` is sdpa's boolean, True = attend.

    fused (BF16_SDPA): PyTorch's fused attention kernel. Not fused (BF16_ATTENTION): two bf16 matmuls with
    the softmax between them fused by inductor."""
    bf16 = [t.to(torch.bfloat16) for t in (query, key, value)]
    if fused:
        out = torch.nn.functional.scaled_dot_product_attention(*bf16, attn_mask=attention_mask, scale=scaling)
    else:
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        scores = torch.matmul(bf16[0], bf16[1].transpose(2, 3)).float() * scale
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        out = torch.matmul(scores.softmax(dim=-1).to(torch.bfloat16), bf16[2])
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def key_padding_mask(**kwargs: Any) -> torch.Tensor | None:
    """An encoder's padding mask as boolean [B, 1, 1, S] (True = attend), which broadcasts over heads and
    queries, instead of sdpa_mask's [B, 1, S, S] built from index arithmetic: inductor fuses the softmax
    with a row mask into one vectorized pass (the index form cost 2.7 ms a layer at batch 8, seq 128).
    Masks that are not plain bidirectional padding (sliding windows, packed sequences) stay sdpa_mask's."""
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

    padding = kwargs.get("attention_mask")
    if kwargs.get("mask_function") is not bidirectional_mask_function or padding is None or padding.ndim != 2:
        return sdpa_mask(**kwargs)
    return padding.to(torch.bool)[:, None, None, :]


def _register_fast_attention() -> None:
    """Make BF16_ATTENTION and BF16_SDPA valid attn_implementations; they take boolean masks that
    broadcast to [B, H, S, S]."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, fused in ((BF16_ATTENTION, False), (BF16_SDPA, True)):
        AttentionInterface.register(name, functools.partial(bf16_attention, fused=fused))
        AttentionMaskInterface.register(name, key_padding_mask)


def dequantized_state_dict(state: dict[str, torch.Tensor], modules: list[str]) -> dict[str, torch.Tensor]:
    """Replace each int8 `X.weight` + `X.weight_scale` pair with a float32 `X.weight`."""
    out = dict(state)
    for module in modules:
        key = f"{module}.weight"
        try:
            q, scale = out[key], out.pop(f"{module}{SCALE_SUFFIX}")
        except KeyError as err:
            raise ArtifactError(f"quantized module {module} has no stored {err.args[0]}") from None
        out[key] = dequantize_per_channel(q, scale)
    return out


def resize_linears(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Rebuild each nn.Linear whose saved weight is smaller (structured pruning removed heads/neurons);
    say whether any was."""
    resized = False
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        if not isinstance(module, nn.Linear) or weight is None or weight.shape == module.weight.shape:
            continue
        out_features, in_features = weight.shape
        replacement = nn.Linear(in_features, out_features, bias=module.bias is not None)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)
        resized = True
    return resized


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], artifact: Artifact) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ArtifactError(
            f"{artifact.path}: the stored weights do not fit a {artifact.manifest['model_type']} "
            f"{artifact.head} model built from config.json: {err}"
        ) from None


class PositionalModel(nn.Module):
    """Positional tensors in, output tuple out: the calling convention torch.export and backends share."""

    def __init__(self, model: nn.Module, input_names: list[str], output_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out: Any = self.model(**dict(zip(self.input_names, tensors, strict=True)), return_dict=True)
        return tuple(out[name] for name in self.output_names)
