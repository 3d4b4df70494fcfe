"""Tiny random models of every encoder family fastcpu supports, each saved with a tokenizer of its
family's kind, as a user's own model would be: no hub, a few layers, hidden 64.

BERT-style families reuse MiniLM's WordPiece vocabulary; the others get a small tokenizer of their own
kind (byte-level BPE for RoBERTa and ModernBERT, a SentencePiece-style unigram model for XLM-RoBERTa and
DeBERTa-v3) trained in a second on the fixture texts, so that each family's special tokens, pair layout
and offsets are the real ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    DebertaV2Tokenizer,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    RobertaTokenizer,
    XLMRobertaTokenizer,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FAMILIES = ("bert", "distilbert", "roberta", "electra", "xlm-roberta", "deberta-v2", "modernbert")
_SHAPE = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
_ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def fixture_texts() -> Iterator[str]:
    """Every context, question and sentence of the SQuAD and SST-2 fixtures."""
    for article in json.loads((FIXTURES / "squad_tiny.json").read_text())["data"]:
        for paragraph in article["paragraphs"]:
            yield paragraph["context"]
            yield from (qa["question"] for qa in paragraph["qas"])
    for name in ("sst2_tiny.tsv", "sst2_tiny_train.tsv"):
        yield from (line.split("\t")[0] for line in (FIXTURES / name).read_text().splitlines()[1:])


def _byte_level_bpe(specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    model.train_from_iterator(fixture_texts(), trainer)
    saved = json.loads(model.to_str())["model"]
    return saved["vocab"], [tuple(pair) for pair in saved["merges"]]


def _unigram(specials: list[str], unk: str) -> list[tuple[str, float]]:
    model = Tokenizer(models.Unigram())
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=800, special_tokens=specials, unk_token=unk)
    model.train_from_iterator(fixture_texts(), trainer)
    return [tuple(piece) for piece in json.loads(model.to_str())["model"]["vocab"]]


def _modernbert_tokenizer() -> PreTrainedTokenizerFast:
    """ModernBERT's kind: byte-level BPE with BERT's special tokens, `[CLS] A [SEP] B [SEP]`."""
    vocab, merges = _byte_level_bpe(_BERT_SPECIALS)
    model = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    cls, sep = ("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])
    model.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=True),
            processors.TemplateProcessing(
                single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[cls, sep]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=model,
        model_input_names=["input_ids", "attention_mask"],
        **{f"{kind}_token": f"[{kind.upper()}]" for kind in ("pad", "unk", "cls", "sep", "mask")},
    )


def family_tokenizer(family: str, minilm: Path):
    """A tokenizer of the family's own kind."""
    if family in ("bert", "distilbert", "electra"):
        names = ["input_ids", "attention_mask"] if family == "distilbert" else None
        return AutoTokenizer.from_pretrained(minilm, **({"model_input_names": names} if names else {}))
    if family == "roberta":
        vocab, merges = _byte_level_bpe(_ROBERTA_SPECIALS)
        return RobertaTokenizer(vocab=vocab, merges=merges)
    if family == "xlm-roberta":
        return XLMRobertaTokenizer(vocab=_unigram(["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<unk>"))
    if family == "deberta-v2":
        return DebertaV2Tokenizer(vocab=_unigram(_BERT_SPECIALS, "[UNK]"), unk_id=1)
    if family == "modernbert":
        return _modernbert_tokenizer()
    raise ValueError(f"no tiny tokenizer for {family!r}")


def _family_settings(family: str, tokenizer) -> dict:
    """Config keys beyond the shared shape: the family's own options at their real models' values."""
    ids = {"pad_token_id": tokenizer.pad_token_id}
    if family == "distilbert":
        return {"dim": 64, "n_layers": 3, "n_heads": 4, "hidden_dim": 128, **ids}
    if family == "deberta-v2":  # DeBERTa-v3's relative attention
        return {
            "relative_attention": True,
            "position_buckets": 256,
            "pos_att_type": ["p2c", "c2p"],
            "max_relative_positions": -1,
            "position_biased_input": False,
            "norm_rel_ebd": "layer_norm",
            "share_att_key": True,
            "type_vocab_size": 0,
            **ids,
        }
    if family == "modernbert":  # one global-attention layer in 3, the others local
        specials = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(f"[{v}]") for k, v in _MODERNBERT_IDS}
        return {"global_attn_every_n_layers": 3, "local_attention": 32, **specials, **ids}
    return ids


_MODERNBERT_IDS = (("cls", "CLS"), ("sep", "SEP"), ("bos", "CLS"), ("eos", "SEP"))


def tiny_family_config(family: str, tokenizer) -> PretrainedConfig:
    shape = {} if family == "distilbert" else _SHAPE
    settings = shape | {"max_position_embeddings": 512} | _family_settings(family, tokenizer)
    return AutoConfig.for_model(family, vocab_size=len(tokenizer), **settings)


def save_tiny_family_model(
    family: str, directory: Path, minilm: Path, auto_class: type = AutoModel, seed: int = 0, **settings
) -> Path:
    """A tiny model of `family` (headless by default) with its tokenizer, saved as a user's local
    checkpoint; `settings` go to its config (e.g. num_labels)."""
    tokenizer = family_tokenizer(family, minilm)
    torch.manual_seed(seed)
    config = tiny_family_config(family, tokenizer)
    config.update(settings)
    auto_class.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
