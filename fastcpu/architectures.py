"""Where each supported model family keeps its layers and the Linear modules inside a layer.

Layer selection, structured pruning and compaction need to know this; everything else treats a model
as a plain `nn.Module`. Adding a family is adding one `LayerMap`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerMap:
    """Dotted paths inside a model family, relative to the model's base model (or one layer)."""

    layers: str  # the nn.ModuleList of Transformer layers, relative to `model.base_model`
    query: str
    key: str
    value: str
    attention_out: str
    ffn_in: str
    ffn_out: str

    @property
    def attention_in(self) -> tuple[str, str, str]:
        return (self.query, self.key, self.value)

    @property
    def stages(self) -> tuple[tuple[str, ...], ...]:
        """The layer's Linears grouped by the input they read, in forward order."""
        return (self.attention_in, (self.attention_out,), (self.ffn_in,), (self.ffn_out,))


_BERT = LayerMap(
    layers="encoder.layer",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attention_out="attention.output.dense",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
)

LAYER_MAPS: dict[str, LayerMap] = {
    "bert": _BERT,
    "roberta": _BERT,
    "electra": _BERT,
    "distilbert": LayerMap(
        layers="transformer.layer",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        attention_out="attention.out_lin",
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
    ),
}


def layer_map(model: nn.Module) -> LayerMap:
    """The LayerMap for this model's family, or a clear error listing the supported families."""
    model_type = model.config.model_type
    if model_type not in LAYER_MAPS:
        raise ValueError(
            f"model type {model_type!r} is not supported yet; supported: {', '.join(sorted(LAYER_MAPS))}"
        )
    return LAYER_MAPS[model_type]


def layers_prefix(model: nn.Module) -> str:
    """The full module name of the list of Transformer layers, e.g. `bert.encoder.layer`."""
    return f"{model.base_model_prefix}.{layer_map(model).layers}"


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of Transformer layers."""
    return model.base_model.get_submodule(layer_map(model).layers)


def encoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the Transformer layers, by its full module name.

    These are the weights that pruning and int8 quantization act on: embeddings, pooler and the
    task head stay dense and in full precision by default (the seed recipe does the same).
    """
    prefix = f"{layers_prefix(model)}."
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(prefix)
    }


def head_dim(model: nn.Module) -> int:
    config = model.config
    return config.hidden_size // config.num_attention_heads
