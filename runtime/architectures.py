"""Where each supported encoder family keeps its Transformer layers and the Linears inside a layer.

Everything that treats a layer as more than a plain `nn.Module` reads this one table: layer selection,
structured pruning and its compaction, 4x1 pruning with reconstruction, `sparsity_report`, and the
runtime when it rebuilds a compacted model. Adding a family is adding one `LayerMap`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerMap:
    """Dotted paths inside a model family, relative to the model's base model (or one layer)."""

    layers: str  # the nn.ModuleList of Transformer layers, relative to `model.base_model`
    attention_in: tuple[str, ...]  # query, key, value; or one fused Linear whose rows are [q; k; v]
    attention_out: str
    ffn_in: str
    ffn_out: str
    gated_ffn: bool = False  # ffn_in's rows are [up; gate] (GLU): FFN neuron j owns rows j and width + j
    head_count: str | None = None  # module whose num_attention_heads/all_head_size must follow its query
    first_layer_required: bool = False  # the family builds layer 0 differently: a student must keep it
    per_layer_config: tuple[str, ...] = ()  # config lists with one entry per layer
    # the module owning query, key and value when its forward is BertSelfAttention's (encoder only):
    # the sparse backend then runs the three as one GEMM there
    bert_self_attention: str | None = None
    # the activation module between ffn_in and ffn_out (None when gated): the sparse backend folds an
    # erf GELU there into ffn_in's epilogue
    ffn_activation: str | None = None

    @property
    def stages(self) -> tuple[tuple[str, ...], ...]:
        """The layer's Linears grouped by the input they read, in forward order."""
        return (self.attention_in, (self.attention_out,), (self.ffn_in,), (self.ffn_out,))

    @property
    def qkv_blocks(self) -> int:
        """How many of q, k, v each attention_in Linear holds: 1 when separate, 3 when fused."""
        return 3 // len(self.attention_in)

    @property
    def ffn_in_blocks(self) -> int:
        """How many row blocks of the FFN width ffn_in holds: 2 when gated."""
        return 2 if self.gated_ffn else 1


_BERT = LayerMap(
    layers="encoder.layer",
    attention_in=("attention.self.query", "attention.self.key", "attention.self.value"),
    attention_out="attention.output.dense",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
    bert_self_attention="attention.self",
    ffn_activation="intermediate.intermediate_act_fn",
)

LAYER_MAPS: dict[str, LayerMap] = {
    "bert": _BERT,
    "roberta": _BERT,
    "electra": _BERT,
    "xlm-roberta": _BERT,
    "distilbert": LayerMap(
        layers="transformer.layer",
        attention_in=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
        attention_out="attention.out_lin",
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
        ffn_activation="ffn.activation",
    ),
    "deberta-v2": LayerMap(  # DeBERTa-v3; its attention reshapes by a stored head count
        layers="encoder.layer",
        attention_in=("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj"),
        attention_out="attention.output.dense",
        ffn_in="intermediate.dense",
        ffn_out="output.dense",
        head_count="attention.self",
        ffn_activation="intermediate.intermediate_act_fn",
    ),
    "modernbert": LayerMap(  # fused QKV, GLU feed-forward, layer 0 without its attention LayerNorm
        layers="layers",
        attention_in=("attn.Wqkv",),
        attention_out="attn.Wo",
        ffn_in="mlp.Wi",
        ffn_out="mlp.Wo",
        gated_ffn=True,
        first_layer_required=True,
        per_layer_config=("layer_types",),
    ),
}


def family_layer_map(model_type: str) -> LayerMap:
    """The LayerMap of a `config.model_type`, or a clear error listing the supported families."""
    if model_type not in LAYER_MAPS:
        raise ValueError(
            f"model type {model_type!r} is not supported yet; supported: {', '.join(sorted(LAYER_MAPS))}"
        )
    return LAYER_MAPS[model_type]


def layer_map(model: nn.Module) -> LayerMap:
    """The LayerMap for this model's family."""
    return family_layer_map(model.config.model_type)


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


def ffn_width(config) -> int:
    """The FFN's inner width; DistilBERT calls it `hidden_dim`, the BERT family `intermediate_size`."""
    width = getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None)
    if width is None:
        raise ValueError(f"{type(config).__name__} names no FFN width (intermediate_size or hidden_dim)")
    return width


def sync_head_counts(model: nn.Module) -> None:
    """After heads were cut out of a layer's attention Linears, tell the attention modules that reshape
    by a stored head count (DeBERTa) how many heads they have left; other families infer it."""
    lmap = layer_map(model)
    if lmap.head_count is None:
        return
    size = head_dim(model)
    for layer in transformer_layers(model):
        attention = layer.get_submodule(lmap.head_count)
        heads = layer.get_submodule(lmap.attention_in[0]).out_features // (size * lmap.qkv_blocks)
        attention.num_attention_heads, attention.all_head_size = heads, heads * size
