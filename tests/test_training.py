"""The training loop is seeded: the same seed gives the same weights, another seed does not."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert_config, tiny_squad_task
from transformers import BertForQuestionAnswering

from fastcpu.distillation import Distiller, build_distillation
from fastcpu.methods import Method
from fastcpu.pruning import MagnitudePruning, make_pruner
from fastcpu.tasks.base import Features
from fastcpu.teacher_outputs import LiveTeacher
from fastcpu.training import (
    Checkpoint,
    TrainingConfig,
    lr_factor,
    train,
    training_autocast,
    trim_padding,
)
from fastcpu_runtime.cpu import cpu_flags


@pytest.fixture(scope="module")
def setup(tokenizer):
    task = tiny_squad_task(max_seq_length=64, doc_stride=16, max_query_length=24)
    return task, task.train_features(tokenizer, list(tokenizer.model_input_names))


def distil_once(setup, seed: int) -> tuple[dict, dict]:
    task, features = setup
    torch.manual_seed(123)  # same initial weights every time; only the training seed varies
    teacher = BertForQuestionAnswering(tiny_bert_config()).eval()
    student = BertForQuestionAnswering(tiny_bert_config())
    config = TrainingConfig(max_steps=5, batch_size=4, precision="bf16")
    distillation = build_distillation({"task_weight": 0.5, "logit_kd": {"weight": 0.5}})
    methods = [
        make_pruner(MagnitudePruning(sparsity=0.5, end=0.5, frequency=1), 5),
        Distiller(distillation, teacher.config),
    ]
    trained = train(
        student,
        task,
        features,
        config,
        seed=seed,
        methods=methods,
        teacher=LiveTeacher(teacher, task.output_names),
    )
    return student.state_dict(), trained.summary


def test_same_seed_same_weights(setup):
    first, first_summary = distil_once(setup, seed=7)
    again, again_summary = distil_once(setup, seed=7)
    other, _ = distil_once(setup, seed=8)
    assert first_summary == again_summary
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_learning_rate_warms_up_decays_and_rewinds_when_the_masks_freeze():
    plain = [lr_factor(step, 100, 0.1) for step in range(100)]
    assert plain[0] == pytest.approx(0.1) and plain[9] == 1.0 and plain[10] == 1.0
    assert plain[55] == pytest.approx(0.5) and plain[99] == pytest.approx(1 / 90)
    pruner = make_pruner(MagnitudePruning(end=0.7, rewind_lr=True), 100)
    assert pruner.lr_restarts() == [70]
    assert make_pruner(MagnitudePruning(end=0.7), 100).lr_restarts() == []
    rewound = [lr_factor(step, 100, 0.1, pruner.lr_restarts()) for step in range(100)]
    assert rewound[:70] == [lr_factor(step, 70, 0.1) for step in range(70)]  # the first segment ends at 0
    assert rewound[69] < 0.02 and rewound[70] == pytest.approx(1 / 3) and rewound[72] == 1.0  # starts over
    assert rewound[99] == pytest.approx(1 / 27)


def test_length_grouped_batches_cover_every_row_once_with_less_padding(setup):
    _, features = setup
    lengths = features.inputs["attention_mask"].sum(1)

    def epoch(by_length: bool) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(3)
        return [rows for rows, _, _ in features.indexed_batches(4, True, generator, by_length=by_length)]

    grouped, plain = epoch(True), epoch(False)
    assert sorted(torch.cat(grouped).tolist()) == list(range(len(features)))
    assert [b.tolist() for b in grouped] == [b.tolist() for b in epoch(True)]  # seeded

    def padded_tokens(batches: list[torch.Tensor]) -> int:
        return sum(int(lengths[b].max()) * len(b) for b in batches)

    assert padded_tokens(grouped) < padded_tokens(plain)
    inputs = {name: tensor[grouped[0]] for name, tensor in features.inputs.items()}
    trimmed = trim_padding(inputs)
    assert trimmed["input_ids"].shape[1] == int(lengths[grouped[0]].max())
    assert torch.equal(trimmed["input_ids"], inputs["input_ids"][:, : trimmed["input_ids"].shape[1]])


class FeaturesKilledAt(Features):
    """The same rows, but the process "dies" when batch `kill_at` is drawn (as a kill -9 would stop it)."""

    def __init__(self, features: Features, kill_at: int) -> None:
        super().__init__(features.inputs, features.labels, features.meta)
        self.kill_at = kill_at

    def indexed_batches(self, *args, **kwargs):
        for number, batch in enumerate(super().indexed_batches(*args, **kwargs)):
            if number == self.kill_at:
                raise SystemExit("killed")
            yield batch


def fine_tune(setup, features: Features, checkpoint: Checkpoint | None) -> dict:
    task, _ = setup
    torch.manual_seed(123)
    model = BertForQuestionAnswering(tiny_bert_config())  # dropout on: the resumed run must restore its rng
    config = TrainingConfig(max_steps=8, batch_size=4, precision="bf16")
    train(model, task, features, config, seed=3, checkpoint=checkpoint)
    return model.state_dict()


def test_a_killed_fine_tuning_resumes_from_its_checkpoint_to_the_same_weights(setup, tmp_path):
    _, features = setup
    uninterrupted = fine_tune(setup, features, None)
    checkpoint = Checkpoint(tmp_path / "run.checkpoint.pt", every_s=0)  # save after every step
    with pytest.raises(SystemExit, match="killed"):
        fine_tune(setup, FeaturesKilledAt(features, kill_at=5), checkpoint)
    assert torch.load(checkpoint.path, weights_only=True)["step"] == 5
    resumed = fine_tune(setup, features, checkpoint)
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    restarted = fine_tune(setup, FeaturesKilledAt(features, kill_at=99), Checkpoint(tmp_path / "none.pt", 0))
    assert all(torch.equal(uninterrupted[k], restarted[k]) for k in uninterrupted)  # no checkpoint: from 0


def test_a_checkpoint_of_another_run_length_is_ignored(setup, tmp_path):
    task, features = setup
    checkpoint = Checkpoint(tmp_path / "run.checkpoint.pt", every_s=0)
    with pytest.raises(SystemExit, match="killed"):
        fine_tune(setup, FeaturesKilledAt(features, kill_at=3), checkpoint)
    assert checkpoint.load(total=8) is not None and checkpoint.load(total=12) is None


def test_methods_cannot_be_resumed_from_a_checkpoint(setup, tmp_path):
    task, features = setup
    student = BertForQuestionAnswering(tiny_bert_config())
    pruner = make_pruner(MagnitudePruning(sparsity=0.5), 4)
    with pytest.raises(ValueError, match="without methods"):
        train(
            student,
            task,
            features,
            TrainingConfig(max_steps=4),
            seed=0,
            methods=[pruner],
            checkpoint=Checkpoint(tmp_path / "c.pt", 0),
        )


class SeenAtEveryStep(Method):
    """Records what `look` reads off the student at every step (a set of the values seen)."""

    def __init__(self, look):
        self.look = look

    def prepare(self, model):
        self.model, self.seen = model, set()

    def before_step(self, step):
        self.seen |= self.look(self.model)


def dropout_probabilities(model) -> set[float]:
    return {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}


def test_cpu_training_runs_eager_attention_and_hands_the_model_back_as_it_was(setup):
    task, features = setup
    config = tiny_bert_config()
    config._attn_implementation = "sdpa"
    student = BertForQuestionAnswering(config)
    probe = SeenAtEveryStep(lambda model: {model.config._attn_implementation})
    train(student, task, features, TrainingConfig(max_steps=2, batch_size=4), seed=0, methods=[probe])
    assert probe.seen == {"eager"}  # on the CPU: as fast as sdpa without dropout, faster with it
    assert student.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(("dropout", "seen"), [(None, {0.1}), (0.0, {0.0})])
def test_training_dropout_applies_while_training_and_the_model_gets_its_own_back(setup, dropout, seen):
    task, features = setup
    student, probe = BertForQuestionAnswering(tiny_bert_config()), SeenAtEveryStep(dropout_probabilities)
    config = TrainingConfig(max_steps=2, batch_size=4, dropout=dropout)
    train(student, task, features, config, seed=0, methods=[probe])
    assert probe.seen == seen
    assert dropout_probabilities(student) == {0.1}


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from /proc/cpuinfo")
def test_auto_precision_is_bf16_exactly_where_the_cpu_has_avx512(caplog):
    """oneDNN runs bf16 on AVX-512 (natively with AVX-512 BF16 or AMX); below it bf16 is emulated and a
    MiniLM step took 7x as long as fp32, so auto trains in fp32 there. An explicit bf16 is kept, with a
    warning where it is emulated."""
    cpu = torch.device("cpu")
    avx512 = {"avx512bw", "avx512vl", "avx512dq"} <= cpu_flags()
    assert training_autocast("auto", cpu)._enabled is avx512
    assert training_autocast("fp32", cpu)._enabled is False
    with caplog.at_level(logging.WARNING, logger="fastcpu.training"):
        forced = training_autocast("bf16", cpu)
    assert forced._enabled is True and forced.fast_dtype == torch.bfloat16
    assert ("emulated" in caplog.text) is not avx512
