"""What the runtime tests (artifact format, sessions and backends) share: the task entries, real
question/context pairs, tiny models sized to the task, and writing an artifact from a model."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
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
    path: Path,
    model,
    tokenizer,
    *,
    task=QA_TASK,
    scheme="none",
    modules=(),
    state=None,
    sparsity=None,
    ranges=None,
    **kwargs,
) -> Path:
    """Write `model` as an artifact; `state` defaults to its own state with `modules` quantized to int8;
    `sparsity` is the manifest's entry (default: not pruned); `ranges` the activation ranges recorded
    (as QAT records them; default: none, the backends calibrate)."""
    quantization = {"scheme": scheme, "modules": list(modules)}
    if ranges is not None:
        quantization["activation_ranges"] = ranges
    manifest = {
        "model_type": model.config.model_type,
        "task": task,
        "quantization": quantization,
        "sparsity": sparsity or {"pattern": "none", "overall": 0.0},
    }
    return write_artifact(
        path,
        manifest=manifest,
        model_config=model.config.to_dict(),
        state_dict=int8_state(model, list(modules)) if state is None else state,
        tokenizer=tokenizer,
        **kwargs,
    )


CALIBRATION_TEXTS = [
    "The committee approved the budget after a long debate.",
    "Rainfall in the valley doubled compared with last spring.",
    "She tuned the violin before the concert started.",
    "Engineers replaced the bridge cables during the night.",
    "The library opens at nine and closes at six.",
    "Migrating birds rest on the lake every autumn.",
]


def scheme_artifacts(root: Path, model, tokenizer) -> dict[str, Path]:
    """`model` written once per scheme (int8 for its encoder Linears), plus a static int8 artifact
    without the calibration set that static int8 needs."""
    calibration = encode(tokenizer, CALIBRATION_TEXTS, padding="max_length", max_length=24)
    int8 = encoder_linears(model)
    return {
        "none": save(root / "fp32", model, tokenizer),
        "bf16": save(root / "bf16", model, tokenizer, scheme="bf16"),
        "static_int8": save(
            root / "static", model, tokenizer, scheme="static_int8", modules=int8, calibration=calibration
        ),
        "dynamic_int8": save(root / "dynamic", model, tokenizer, scheme="dynamic_int8", modules=int8),
        "static_no_calib": save(root / "nocalib", model, tokenizer, scheme="static_int8", modules=int8),
    }


def eager_outputs(artifact: Path, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Eager on the very weights the artifact stores (int8 dequantized, bf16 upcast)."""
    from fastcpu_runtime import create_session

    return create_session(artifact, "eager", batch_size=BATCH, seq_len=SEQ).run(inputs)


def logits_cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], mask: torch.Tensor) -> float:
    """Cosine similarity of all logits at real (unmasked) positions."""
    flat_a = torch.cat([a[k][mask.bool()] for k in sorted(a)]).double()
    flat_b = torch.cat([b[k][mask.bool()] for k in sorted(b)]).double()
    return F.cosine_similarity(flat_a, flat_b, dim=0).item()
