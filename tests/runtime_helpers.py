"""What the runtime tests (artifact format, sessions and backends) share: the task entries, real
question/context pairs, tiny models sized to the task, and writing an artifact from a model."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_bert_model
from transformers import BertPreTrainedModel

from fastcpu_runtime import quantize_per_channel, write_artifact

INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
QA_TASK = {
    "name": "squad",
    "head": "question_answering",
    "input_names": INPUT_NAMES,
    "output_names": ["start_logits", "end_logits"],
    "max_seq_length": 64,
    "pad_token_id": 0,
}
CLS_TASK = {**QA_TASK, "name": "sst2", "head": "sequence_classification", "output_names": ["logits"]}
QUESTIONS = ["Where is the Eiffel Tower?", "Who wrote Hamlet?", "What do bees make?", "When did the war end?"]
CONTEXTS = [
    "The Eiffel Tower stands in Paris, on the Champ de Mars next to the Seine.",
    "Hamlet is a tragedy written by William Shakespeare around 1600.",
    "Honey bees collect nectar and turn it into honey inside the hive.",
    "The Second World War ended in 1945 after six years of fighting.",
]


def tiny_runtime_model(
    model_class: type[BertPreTrainedModel], seed: int = 0, **overrides
) -> BertPreTrainedModel:
    """The tiny BERT with exactly as many positions as the tasks' max_seq_length."""
    return tiny_bert_model(model_class, seed, max_position_embeddings=QA_TASK["max_seq_length"], **overrides)


def encode(tokenizer, *texts: list[str], **kwargs) -> dict[str, torch.Tensor]:
    """`tokenizer(*texts, **kwargs)` as the runtime's named input tensors."""
    enc = tokenizer(*texts, return_tensors="pt", **kwargs)
    return {name: enc[name] for name in INPUT_NAMES}


BATCH, SEQ = 4, 32  # the fixed session shape of the runtime backend tests


def encode_pairs(tokenizer, count: int = len(QUESTIONS)) -> dict[str, torch.Tensor]:
    """The first `count` question/context pairs, padded to their own longest length."""
    return encode(tokenizer, QUESTIONS[:count], CONTEXTS[:count], padding=True)


def encoder_linears(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in f".{n}"]


def int8_state(model: torch.nn.Module, modules: list[str]) -> dict[str, torch.Tensor]:
    """The model's state with the weights of `modules` quantized per channel (plus their scales)."""
    state = dict(model.state_dict())
    for name in modules:
        state[f"{name}.weight"], state[f"{name}.weight_scale"] = quantize_per_channel(state[f"{name}.weight"])
    return state


def save(
    path: Path, model, tokenizer, *, task=QA_TASK, scheme="none", modules=(), state=None, **kwargs
) -> Path:
    """Write `model` as an artifact; `state` defaults to its own state with `modules` quantized to int8."""
    manifest = {
        "model_type": "bert",
        "task": task,
        "quantization": {"scheme": scheme, "modules": list(modules)},
        "sparsity": {"pattern": "none", "overall": 0.0},
    }
    return write_artifact(
        path,
        manifest=manifest,
        model_config=model.config.to_dict(),
        state_dict=int8_state(model, list(modules)) if state is None else state,
        tokenizer=tokenizer,
        **kwargs,
    )
