"""Pruning: cubic schedule values, exact achieved sparsity, 4x1 block structure, frozen masks and
structured compaction that leaves the outputs unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert_config
from transformers import BertForQuestionAnswering

from fastcpu.architectures import encoder_linears
from fastcpu.pruning import (
    MagnitudePruning,
    Schedule,
    StructuredPruning,
    cubic_sparsity,
    magnitude_mask,
    make_pruner,
    sparsity_report,
)


def test_cubic_schedule_values():
    schedule = Schedule(start=0.1, end=0.6, frequency=1)
    # 100 steps: pruning runs from step 10 to step 60.
    assert cubic_sparsity(0, 100, 0.8, schedule) == 0.0
    assert cubic_sparsity(10, 100, 0.8, schedule) == 0.0
    assert cubic_sparsity(35, 100, 0.8, schedule) == pytest.approx(0.8 * (1 - 0.5**3))
    assert cubic_sparsity(60, 100, 0.8, schedule) == 0.8
    assert cubic_sparsity(99, 100, 0.8, schedule) == 0.8
    values = [cubic_sparsity(s, 100, 0.8, schedule) for s in range(100)]
    assert values == sorted(values)  # never decreases


@pytest.mark.parametrize("pattern", ["unstructured", "4x1"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.9])
def test_mask_prunes_exactly_the_target(pattern, sparsity):
    weight = torch.randn(64, 96)
    keep = magnitude_mask(weight, sparsity, pattern)
    assert keep.shape == weight.shape
    assert (~keep).float().mean().item() == pytest.approx(
        sparsity, abs=1e-9 if sparsity in (0.0, 0.5) else 2e-3
    )
    units = weight.numel() // (4 if pattern == "4x1" else 1)
    assert int((~keep).sum()) == round(sparsity * units) * (4 if pattern == "4x1" else 1)


def test_4x1_masks_are_whole_blocks_of_lowest_norm():
    weight = torch.randn(32, 16)
    keep = magnitude_mask(weight, 0.75, "4x1")
    blocks = keep.view(8, 4, 16)
    assert bool(((blocks.all(dim=1)) | (~blocks).all(dim=1)).all()), "a 4x1 block is partly pruned"
    norms = weight.abs().view(8, 4, 16).sum(1)
    kept, pruned = norms[blocks[:, 0, :]], norms[~blocks[:, 0, :]]
    assert pruned.max() <= kept.min()


def test_magnitude_pruner_reaches_target_and_freezes_masks():
    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config())
    config = MagnitudePruning(sparsity=0.8, pattern="4x1", start=0.0, end=0.5, frequency=2)
    pruner = make_pruner(config, model, total_steps=20)
    masks_at_end = None
    for step in range(20):
        pruner.update(step)
        with torch.no_grad():  # stands in for an optimizer step that would revive pruned weights
            for module in encoder_linears(model).values():
                module.weight.add_(0.01 * torch.randn_like(module.weight))
        pruner.apply_masks()
        if step == 10:
            masks_at_end = {k: v.clone() for k, v in pruner.masks.items()}
    assert all(torch.equal(masks_at_end[k], pruner.masks[k]) for k in masks_at_end)
    info = pruner.finalize()
    report = sparsity_report(model)
    assert info == {"method": "magnitude", "pattern": "4x1", "target": 0.8}
    for name, module in encoder_linears(model).items():  # exactly round(0.8 * blocks) zero 4x1 blocks
        blocks = module.weight.numel() // 4
        assert report["per_layer"][name] == round(0.8 * blocks) / blocks
    assert len(report["per_layer"]) == 2 * 6
    assert report["overall"] == pytest.approx(0.8, abs=1e-3)
    assert model.qa_outputs.weight.count_nonzero() == model.qa_outputs.weight.numel()  # head not pruned
    assert model.bert.embeddings.word_embeddings.weight.count_nonzero() > 0


def test_structured_pruning_compacts_without_changing_outputs():
    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert_config()).eval()
    config = StructuredPruning(heads=0.5, ffn=0.5, start=0.0, end=0.5, frequency=1)
    pruner = make_pruner(config, model, total_steps=4)
    for step in range(4):
        pruner.update(step)
    inputs = {
        "input_ids": torch.randint(1000, 2000, (2, 24)),
        "attention_mask": torch.ones(2, 24, dtype=torch.long),
    }
    with torch.no_grad():
        masked = model(**inputs).start_logits
    info = pruner.finalize()
    with torch.no_grad():
        compact = model(**inputs).start_logits
    assert info["heads_per_layer"] == [2, 2] and info["ffn_per_layer"] == [64, 64]
    layer = model.bert.encoder.layer[0]
    assert layer.attention.self.query.weight.shape == (32, 64)
    assert layer.attention.output.dense.weight.shape == (64, 32)
    assert layer.intermediate.dense.weight.shape == (64, 64)
    assert layer.output.dense.weight.shape == (64, 64)
    torch.testing.assert_close(compact, masked, atol=1e-5, rtol=1e-5)
    assert sparsity_report(model)["overall"] == pytest.approx(0.5, abs=1e-6)
