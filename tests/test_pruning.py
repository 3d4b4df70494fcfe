"""Pruning: cubic schedule values, the schedule followed during real training, exact achieved sparsity,
4x1 block structure, global scope, frozen masks and structured compaction that leaves the outputs
unchanged."""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import replace

import pytest
import torch
from conftest import MINILM, tiny_bert_config, tiny_bert_model, tiny_squad_task
from families import family_tokenizer, tiny_family_config
from transformers import AutoModelForQuestionAnswering, BertForQuestionAnswering

from fastcpu.methods import Method
from fastcpu.pruning import (
    MagnitudePruning,
    MovementPruning,
    ReconstructPruning,
    Schedule,
    StructuredPruning,
    magnitude_mask,
    make_pruner,
    reconstruct,
    select_units,
    sparsity_report,
)
from fastcpu.pruning.masks import unit_view
from fastcpu.pruning.reconstruct import lamp_scores
from fastcpu.quantization import SCHEMES, make_quantizer
from fastcpu.training import TrainingConfig, train
from fastcpu_runtime.architectures import encoder_linears


def test_cubic_schedule_values():
    schedule = Schedule(start=0.1, end=0.6, frequency=1)
    # 100 steps: pruning runs from step 10 to step 60.
    assert schedule.sparsity_at(0, 100, 0.8) == 0.0
    assert schedule.sparsity_at(10, 100, 0.8) == 0.0
    assert schedule.sparsity_at(35, 100, 0.8) == pytest.approx(0.8 * (1 - 0.5**3))
    assert schedule.sparsity_at(60, 100, 0.8) == 0.8
    assert schedule.sparsity_at(99, 100, 0.8) == 0.8
    values = [schedule.sparsity_at(s, 100, 0.8) for s in range(100)]
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
    pruner = make_pruner(config, total_steps=20)
    pruner.prepare(model)
    masks_at_end = None
    for step in range(20):
        pruner.before_step(step)
        with torch.no_grad():  # stands in for an optimizer step that would revive pruned weights
            for module in encoder_linears(model).values():
                module.weight.add_(0.01 * torch.randn_like(module.weight))
        pruner.after_optimizer_step(step)
        if step == 10:
            masks_at_end = {k: v.clone() for k, v in pruner.masks.items()}
    assert all(torch.equal(masks_at_end[k], pruner.masks[k]) for k in masks_at_end)
    info = pruner.finalize(model)
    report = sparsity_report(model)
    assert {k: info[k] for k in ("method", "pattern", "scope", "target")} == {
        "method": "magnitude",
        "pattern": "4x1",
        "scope": "layer",
        "target": 0.8,
    }
    assert info["per_layer"] == pytest.approx({k: report["per_layer"][k] for k in info["per_layer"]})
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
    pruner = make_pruner(config, total_steps=4)
    pruner.prepare(model)
    for step in range(4):
        pruner.before_step(step)
    inputs = {
        "input_ids": torch.randint(1000, 2000, (2, 24)),
        "attention_mask": torch.ones(2, 24, dtype=torch.long),
    }
    with torch.no_grad():
        masked = model(**inputs).start_logits
    info = pruner.finalize(model)
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


def test_global_scope_gives_each_layer_its_own_sparsity_and_hits_the_target_overall():
    """One threshold over all units: a layer of small weights gives up more than a layer of large ones,
    and exactly round(sparsity * all units) units go."""
    generator = torch.Generator().manual_seed(0)
    scores = {
        "small": torch.rand(16, 32, generator=generator),
        "large": 3 * torch.rand(16, 32, generator=generator),
        "mixed": 2 * torch.rand(8, 32, generator=generator),
    }
    keep = select_units(scores, 0.6, "global")
    pruned = {name: int((~k).sum()) for name, k in keep.items()}
    assert sum(pruned.values()) == round(0.6 * sum(s.numel() for s in scores.values()))
    fractions = {name: pruned[name] / scores[name].numel() for name in scores}
    assert fractions["small"] > fractions["mixed"] > fractions["large"]
    threshold = max(scores[n][~keep[n]].max() for n in scores)
    assert all(scores[n][keep[n]].min() >= threshold for n in scores)
    layer = select_units(scores, 0.6, "layer")
    assert {int((~k).sum()) for k in layer.values()} == {round(0.6 * 16 * 32), round(0.6 * 8 * 32)}


class SparsityRecorder(Method):
    """Records the encoder's sparsity after every optimizer step of a real training run."""

    def __init__(self) -> None:
        self.history: list[float] = []

    def prepare(self, model: torch.nn.Module) -> None:
        self.model = model

    def after_optimizer_step(self, step: int) -> None:
        self.history.append(sparsity_report(self.model)["overall"])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_masks_follow_the_cubic_schedule_during_training(tokenizer, scope):
    """Sparsity at intermediate steps of `train` equals the schedule's value at the last mask update,
    reaches the target at the end step and stays there (frozen masks) while the weights keep training."""
    task = tiny_squad_task(max_seq_length=64, doc_stride=16, max_query_length=24)
    features = task.train_features(tokenizer, list(tokenizer.model_input_names))
    model = tiny_bert_model(BertForQuestionAnswering)
    config = MagnitudePruning(sparsity=0.75, pattern="4x1", scope=scope, start=0.2, end=0.7, frequency=2)
    recorder = SparsityRecorder()
    steps = 20
    methods = [make_pruner(config, steps), recorder]
    training = TrainingConfig(max_steps=steps, batch_size=4, learning_rate=1e-3, precision="fp32")
    train(model, task, features, training, seed=0, methods=methods)
    last_update = 0.0
    for step, measured in enumerate(recorder.history):
        if config.update_due(step, steps):
            last_update = config.sparsity_at(step, steps, config.sparsity)
        assert measured == pytest.approx(last_update, abs=0.01), step
    assert recorder.history[3] == 0.0 and 0.0 < recorder.history[6] < recorder.history[10] < 0.75
    assert recorder.history[14:] == pytest.approx([0.75] * 6, abs=0.005)


def test_movement_keeps_the_units_training_grows_not_the_largest():
    """Scores are -sum(grad * W): a small weight that the gradient pushes outward outranks a large one it
    pulls toward zero, and a pruned weight comes back with its value when its score recovers."""
    linear = torch.nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.1, 5.0]] * 4))
    pruner = make_pruner(MovementPruning(sparsity=0.5, pattern="unstructured", end=1.0, frequency=1), 10)
    pruner.linears, pruner.scores = {"w": linear}, {"w": torch.zeros(4, 2)}
    pruner.masks, pruner.kept_aside = (
        {"w": torch.ones(4, 2, dtype=torch.bool)},
        {"w": linear.weight.detach().clone()},
    )
    linear.weight.grad = torch.tensor([[-1.0, 1.0]] * 4)  # grows the 0.1s, shrinks the 5.0s
    pruner.after_backward(0)
    torch.testing.assert_close(pruner.scores["w"], torch.tensor([[0.1, -5.0]] * 4))
    pruner.update_masks(0.5)
    assert linear.weight[:, 1].abs().sum() == 0 and linear.weight[:, 0].abs().min() > 0
    linear.weight.grad = torch.tensor([[1.0, -10.0]] * 4)  # now the other way round
    pruner.after_backward(1)
    pruner.update_masks(0.5)
    torch.testing.assert_close(linear.weight[:, 1], torch.full((4,), 5.0))  # back with its value


@pytest.mark.parametrize(("pattern", "scope"), [("4x1", "layer"), ("unstructured", "global")])
def test_movement_scores_follow_the_gradients_and_masks_hit_the_target(tokenizer, pattern, scope):
    task = tiny_squad_task(max_seq_length=64, doc_stride=16, max_query_length=24)
    features = task.train_features(tokenizer, list(tokenizer.model_input_names))
    model = tiny_bert_model(BertForQuestionAnswering)
    config = MovementPruning(sparsity=0.8, pattern=pattern, scope=scope, start=0.0, end=0.6, frequency=2)
    pruner = make_pruner(config, 10)
    movement = GradientRecorder(pruner)
    training = TrainingConfig(max_steps=10, batch_size=4, learning_rate=1e-3, precision="fp32")
    train(model, task, features, training, seed=0, methods=[movement, pruner])
    for name, scores in pruner.scores.items():
        torch.testing.assert_close(scores, movement.total[name], rtol=1e-4, atol=1e-6)
        assert scores.abs().sum() > 0
    units = {name: mask.numel() // (4 if pattern == "4x1" else 1) for name, mask in pruner.masks.items()}
    pruned = {
        name: int((~mask).sum()) // (4 if pattern == "4x1" else 1) for name, mask in pruner.masks.items()
    }
    if scope == "layer":
        assert all(pruned[name] == round(0.8 * units[name]) for name in units)
    else:
        assert sum(pruned.values()) == round(0.8 * sum(units.values()))
        assert len({round(pruned[name] / units[name], 3) for name in units}) > 1
    assert sparsity_report(model)["overall"] == pytest.approx(0.8, abs=0.002)


class GradientRecorder(Method):
    """-sum(grad * W) over the steps before the masks freeze (6 of 10), from the gradients the loop
    computed; W is the dense weight: what the pruner's masks hide, it keeps aside."""

    def __init__(self, pruner) -> None:
        self.pruner = pruner

    def prepare(self, model: torch.nn.Module) -> None:
        self.linears = encoder_linears(model)
        self.total = {name: torch.zeros_like(m.weight) for name, m in self.linears.items()}

    def after_backward(self, step: int) -> None:
        if step >= 6:
            return
        for name, module in self.linears.items():
            dense = torch.where(self.pruner.masks[name], module.weight, self.pruner.kept_aside[name])
            self.total[name] -= module.weight.grad * dense.detach()


class SoftScoreRecorder(Method):
    """Runs after a soft movement pruner: its initial scores, the straight-through gradient of step 0
    (grad * W per unit: the masks are all ones then) with the scores stepped from it, and after every step
    the fraction of units below the threshold and the sparsity of the model's weights."""

    def __init__(self, pruner) -> None:
        self.pruner = pruner
        self.below: list[float] = []
        self.applied: list[float] = []

    def prepare(self, model: torch.nn.Module) -> None:
        self.model = model
        self.initial = {name: score.detach().clone() for name, score in self.pruner.scores.items()}

    def after_backward(self, step: int) -> None:
        if step == 0:
            pattern = self.pruner.config.pattern
            linears = self.pruner.linears.items()
            self.first = {name: unit_view(m.weight.grad * m.weight.detach(), pattern) for name, m in linears}
            self.after_first = {name: score.detach().clone() for name, score in self.pruner.scores.items()}

    def after_optimizer_step(self, step: int) -> None:
        self.below.append(self.pruner.below_threshold(list(self.pruner.linears)))
        self.applied.append(sparsity_report(self.model)["overall"])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_soft_movement_learns_scores_follows_the_schedule_and_ends_at_the_target(tokenizer, scope):
    """Soft movement: the first step moves each score against grad * W in units of its Linear's mean
    |grad * W| (the penalty is 0 then); the units below the threshold follow the cubic schedule during
    training, steered by the penalty; when the masks freeze, top-k over the learned scores sets exactly
    the target (per Linear, or overall with per-Linear sparsities of its choosing)."""
    task = tiny_squad_task(max_seq_length=64, doc_stride=16, max_query_length=24)
    features = task.train_features(tokenizer, list(tokenizer.model_input_names))
    model = tiny_bert_model(BertForQuestionAnswering)
    steps, target = 30, 0.8
    config = MovementPruning(sparsity=target, scope=scope, variant="soft", end=0.7, frequency=1)
    pruner = make_pruner(config, steps)
    recorder = SoftScoreRecorder(pruner)
    training = TrainingConfig(max_steps=steps, batch_size=4, learning_rate=1e-3, precision="fp32")
    train(model, task, features, training, seed=0, methods=[pruner, recorder])

    lr = config.score_learning_rate
    for name, first in recorder.first.items():
        expected = recorder.initial[name] - lr * first / first.abs().mean()
        torch.testing.assert_close(recorder.after_first[name], expected, rtol=1e-5, atol=1e-7)
    end = config.steps(steps)[1]  # 21: the masks freeze there
    schedule = [config.sparsity_at(step, steps, target) for step in range(end)]
    assert recorder.below[0] < 0.05 and max(recorder.below[:end]) > 0.6  # outliers may cross at once
    for step in range(4, end):  # at most 4 steps behind the schedule, never ahead of it by much
        assert schedule[step - 4] - 0.02 <= recorder.below[step] <= schedule[step] + 0.05, (
            step,
            recorder.below,
        )
    assert recorder.applied[end - 1] == pytest.approx(recorder.below[end - 2], abs=0.01)  # a step later
    assert recorder.applied[end:] == pytest.approx([target] * (steps - end), abs=0.002)

    record = pruner.finalize(model)
    assert record["variant"] == "soft" and abs(record["threshold_sparsity"] - target) < 0.1
    units = {name: unit_view(mask.float(), "4x1") for name, mask in pruner.masks.items()}
    kept = {name: unit > 0 for name, unit in units.items()}
    scores = {name: score.detach() for name, score in pruner.scores.items()}
    if scope == "layer":
        assert all((~k).float().mean().item() == pytest.approx(target, abs=0.01) for k in kept.values())
        assert all(scores[n][kept[n]].min() >= scores[n][~kept[n]].max() for n in kept)
    else:
        every = torch.cat([k.flatten() for k in kept.values()])
        assert int((~every).sum()) == round(target * every.numel())
        assert len({round(s, 3) for s in record["per_layer"].values()}) > 1
        lowest_kept = min(scores[n][kept[n]].min() for n in kept)
        assert all(scores[n][~kept[n]].max() <= lowest_kept for n in kept)


@pytest.mark.parametrize("pattern", ["4x1", "unstructured"])
def test_reconstruction_solves_the_kept_weights_exactly(pattern):
    """Same sparsity, exact per row (group): the kept weights are the least-squares solution on the inputs
    seen, so the output error is far below magnitude pruning's and equals a direct lstsq on that mask."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2000, 64, generator=generator) @ torch.randn(64, 64, generator=generator)
    linear = torch.nn.Linear(64, 32)
    original = linear.weight.detach().clone()
    keep = reconstruct(linear, inputs.T @ inputs / len(inputs), 0.6, pattern, damping=1e-8)
    assert bool((linear.weight[~keep] == 0).all())
    assert (~keep).float().mean().item() == math.ceil(0.6 * 64) / 64  # at least the target in every row
    if pattern == "4x1":
        blocks = keep.view(8, 4, 64)
        assert bool((blocks.all(1) | (~blocks).all(1)).all()), "a 4x1 block is partly pruned"

    def error(weight: torch.Tensor) -> float:
        return float((inputs @ original.T - inputs @ weight.T).pow(2).mean())

    best = torch.zeros_like(original)
    for row in range(32):
        best[row, keep[row]] = torch.linalg.lstsq(inputs[:, keep[row]], inputs @ original[row]).solution
    assert error(linear.weight.detach()) == pytest.approx(error(best), rel=1e-3)
    assert error(linear.weight.detach()) < 0.7 * error(original * magnitude_mask(original, 0.6, pattern))


@pytest.mark.parametrize(
    ("scheme", "stages", "end", "kept", "sparsities"),
    [
        # one shot at step 4: inputs of steps 2 and 3 (max_batches), then none
        ("static_int8", 1, 0.4, [0, 0, 0, 1] + [0] * 6, [0.0] * 4 + [0.75] * 6),
        # steps 3 and 6, the first at the cubic schedule's midpoint: 0.75 * (1 - 0.5**3)
        ("qat_int8", 2, 0.6, [0, 0, 1, 0, 0, 1] + [0] * 4, [0.0] * 3 + [0.65625] * 3 + [0.75] * 4),
    ],
)
def test_reconstruction_collects_inputs_in_training_then_prunes(
    tokenizer, scheme, stages, end, kept, sparsities
):
    """Inputs are kept from the `max_batches` training steps before each pruning step (through QAT's
    wrappers too), every Linear is pruned at those steps, units once pruned stay pruned, and the masks
    stay as they are after `end`."""
    task = tiny_squad_task(max_seq_length=64, doc_stride=16, max_query_length=24)
    features = task.train_features(tokenizer, list(tokenizer.model_input_names))
    model = tiny_bert_model(BertForQuestionAnswering)
    config = ReconstructPruning(sparsity=0.75, pattern="4x1", end=end, max_batches=2, stages=stages)
    pruner = make_pruner(config, 10)
    recorder = SparsityRecorder()
    seen, masks = [], []

    def before_step(step: int) -> None:
        seen.append(len(pruner.calibration))
        masks.append({name: mask.clone() for name, mask in pruner.masks.items()})

    recorder.before_step = before_step
    quantizer = make_quantizer(
        SCHEMES.build({"scheme": scheme, "start": 0.0} if scheme == "qat_int8" else {"scheme": scheme}), 10
    )
    training = TrainingConfig(max_steps=10, batch_size=4, learning_rate=1e-3, precision="fp32")
    train(model, task, features, training, seed=0, methods=[pruner, quantizer, recorder])
    assert seen == kept
    assert pruner.hook is None
    assert recorder.history == pytest.approx(sparsities, abs=0.01)
    assert sparsity_report(model)["overall"] == pytest.approx(0.75, abs=0.005)
    for earlier, later in itertools.pairwise(masks):
        assert all(not (later[n] & ~earlier[n]).any() for n in later)  # nothing pruned comes back


def test_staged_reconstruction_prunes_on_schedule_and_can_rewind_the_learning_rate_at_each_stage():
    config = ReconstructPruning(sparsity=0.8, start=0.1, end=0.7, stages=3)
    pruner = make_pruner(config, 100)
    assert pruner.stage_steps() == [30, 50, 70] and pruner.lr_restarts() == []
    assert [config.sparsity_at(s, 100, 0.8) for s in pruner.stage_steps()] == pytest.approx(
        [0.8 * (1 - (2 / 3) ** 3), 0.8 * (1 - (1 / 3) ** 3), 0.8]
    )
    assert make_pruner(replace(config, rewind_lr=True), 100).lr_restarts() == [30, 50, 70]


def test_reconstruction_in_forward_order_beats_solving_each_linear_on_dense_inputs(tokenizer):
    """Solving each Linear on the inputs the already-pruned layers give it, towards the dense outputs,
    leaves the model's logits closer to the dense model's than solving each on dense inputs alone."""
    model = tiny_bert_model(BertForQuestionAnswering).eval()
    inputs = dict(
        tokenizer(["a question about pruning"] * 4, ["some context " * 12] * 4, return_tensors="pt")
    )
    dense = {k: v.detach() for k, v in model(**inputs).items() if k.endswith("logits")}

    def logit_error(pruned: torch.nn.Module) -> float:
        with torch.no_grad():
            out = pruned(**inputs)
        return sum(float((out[k] - v).pow(2).mean()) for k, v in dense.items())

    in_order = copy.deepcopy(model)
    pruner = make_pruner(ReconstructPruning(sparsity=0.6, pattern="4x1"), 10)
    pruner.prepare(in_order)
    pruner.calibration = [inputs]
    pruner.update_masks(0.6)

    each_alone = copy.deepcopy(model)
    linears = encoder_linears(each_alone)
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
        for n, m in linears.items()
    ]
    with torch.no_grad():
        each_alone(**inputs)
    for hook in hooks:
        hook.remove()
    for name, linear in linears.items():
        reconstruct(linear, seen[name].T @ seen[name] / len(seen[name]), 0.6, "4x1", 0.01)
    assert sparsity_report(in_order)["overall"] == pytest.approx(0.6, abs=0.01)
    print(f"logit error: in order {logit_error(in_order):.3g}, each alone {logit_error(each_alone):.3g}")
    assert logit_error(in_order) < 0.8 * logit_error(each_alone)


def test_reconstruction_takes_the_first_input_of_a_linear_a_layer_calls_twice():
    """DeBERTa-v2's attention calls its key projection on the hidden states, then again on the relative
    position embeddings: the key is solved on the hidden states, and every Linear reaches the target."""
    torch.manual_seed(0)
    config = tiny_family_config("deberta-v2", family_tokenizer("deberta-v2", MINILM))
    model = AutoModelForQuestionAnswering.from_config(config).eval()
    pruner = make_pruner(ReconstructPruning(sparsity=0.6, pattern="4x1"), 10)
    pruner.prepare(model)
    pruner.calibration = [{"input_ids": torch.randint(5, config.vocab_size, (2, 24))}]
    pruner.update_masks(0.6)
    report = sparsity_report(model)
    assert report["overall"] == pytest.approx(0.6, abs=0.01)
    keys = [v for k, v in report["per_layer"].items() if k.endswith("key_proj")]
    assert len(keys) == config.num_hidden_layers and all(v == pytest.approx(0.6, abs=0.02) for v in keys)


def test_lamp_scores_rank_within_a_tensor_and_give_its_largest_unit_one():
    """LAMP (Lee et al., 2021): a unit's saliency over the sum of its own and every larger one's."""
    scores = lamp_scores(torch.tensor([[3.0, 1.0], [2.0, 0.0]]))
    torch.testing.assert_close(scores, torch.tensor([[1.0, 1 / 6], [2 / 5, 0.0]]))
    big = lamp_scores(torch.rand(16, 8) * 1000)  # the scale of a tensor does not matter
    assert big.max() == 1.0 and (big <= 1.0).all()


def test_global_reconstruction_gives_each_linear_its_own_sparsity_and_hits_the_target(tokenizer):
    """One threshold over the LAMP scores of every unit of every Linear: the per-Linear sparsities differ,
    no Linear loses all its units, and the model as a whole is at the target."""
    model = tiny_bert_model(BertForQuestionAnswering).eval()
    inputs = dict(
        tokenizer(["a question about pruning"] * 4, ["some context " * 12] * 4, return_tensors="pt")
    )
    pruner = make_pruner(ReconstructPruning(sparsity=0.7, pattern="4x1", scope="global"), 10)
    pruner.prepare(model)
    pruner.calibration = [inputs]
    targets = pruner.linear_sparsities(0.7)
    units = {name: m.weight.numel() // 4 for name, m in pruner.linears.items()}
    pruned = sum(round(targets[name] * n) for name, n in units.items())
    assert pruned == round(0.7 * sum(units.values()))
    assert len({round(t, 3) for t in targets.values()}) > 3 and max(targets.values()) < 1.0
    pruner.update_masks(0.7)
    record = pruner.finalize(model)
    assert record["scope"] == "global"
    assert record["per_layer"] == pytest.approx(targets, abs=1 / 16)  # each row of units rounds up
    assert sparsity_report(model)["overall"] == pytest.approx(0.7, abs=0.03)
