"""Sessions and backends: padding, the eager reference, native compile / PT2E int8, and benchmarking.

Each native session compiles (seconds even for this tiny model), so there is one per scheme.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from runtime_helpers import (
    BATCH,
    CLS_TASK,
    INPUT_NAMES,
    QA_TASK,
    SEQ,
    save,
    tiny_runtime_model,
)
from torch._dynamo.utils import counters
from transformers import BertForSequenceClassification

from fastcpu_runtime import (
    BackendError,
    BenchmarkResult,
    Session,
    available_backends,
    benchmark,
    create_session,
    load_artifact,
)
from fastcpu_runtime.backends.native import quantize_pt2e_model, quantized_linears
from fastcpu_runtime.cpu import int8_dot_product
from fastcpu_runtime.modeling import PositionalModel


def tiny_model(model_class, **overrides):
    # at initializer_range 0.02 the encoder barely moves the logits, so int8 error would hide
    return tiny_runtime_model(model_class, initializer_range=0.2, **overrides)


@pytest.fixture(scope="module")
def eager_session(artifacts) -> Session:
    return create_session(load_artifact(artifacts["none"]), "eager", batch_size=BATCH, seq_len=SEQ)


@pytest.fixture(scope="module")
def eager_reference(eager_session, qa_inputs) -> dict[str, torch.Tensor]:
    return eager_session.run(qa_inputs)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def valid(outputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Concatenated logits at real (unmasked) positions only."""
    return torch.cat([outputs[k][mask.bool()] for k in sorted(outputs)])


# -------------------------------------------------------------------------------------------- registry


def test_available_backends_lists_the_builtins():
    assert {"eager", "native"} <= set(available_backends())


def test_unknown_backend_names_it_and_lists_available(artifacts):
    with pytest.raises(BackendError, match="'tensorrt'") as info:
        create_session(artifacts["none"], "tensorrt", batch_size=1, seq_len=8)
    assert "eager" in str(info.value) and "native" in str(info.value)


# -------------------------------------------------------------------------------------- eager / padding


def test_eager_session_equals_unpadded_module_call(eager_session, qa_model, qa_inputs):
    assert eager_session.backend == "eager" and "eager" in eager_session.description
    b, s = 3, qa_inputs["input_ids"].shape[1] - 2  # fewer rows and a shorter sequence than the session shape
    small = {k: v[:b, :s].clone() for k, v in qa_inputs.items()}
    got = eager_session.run(small)
    with torch.no_grad():
        want = qa_model(**small)
    mask = small["attention_mask"].bool()
    for name in ("start_logits", "end_logits"):
        assert got[name].shape == (b, s) and got[name].dtype == torch.float32
        torch.testing.assert_close(got[name][mask], want[name][mask], atol=1e-5, rtol=0)


def test_classification_outputs_are_per_row(tmp_path, tokenizer, qa_inputs):
    model = tiny_model(BertForSequenceClassification, num_labels=3)
    session = create_session(
        save(tmp_path / "cls", model, tokenizer, task=CLS_TASK), "eager", batch_size=4, seq_len=SEQ
    )
    small = {k: v[:2] for k, v in qa_inputs.items()}
    got = session.run(small)["logits"]
    with torch.no_grad():
        want = model(**small).logits
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_inputs_larger_than_the_session_are_rejected(eager_session):
    with pytest.raises(ValueError, match="larger than the session shape"):
        eager_session.run({"input_ids": torch.zeros(BATCH + 1, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="larger than the session shape"):
        eager_session.run({"input_ids": torch.zeros(1, SEQ + 1, dtype=torch.long)})


def test_threads_are_applied(artifacts):
    before = torch.get_num_threads()
    try:
        session = create_session(artifacts["none"], "eager", batch_size=1, seq_len=8, threads=1)
        assert session.threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_benchmark_reports_sane_numbers(eager_session):
    result = benchmark(eager_session, warmup=1, rounds=3, iterations=3)
    assert isinstance(result, BenchmarkResult)
    low, high = result.throughput_spread
    assert 0 < low <= result.throughput <= high
    assert 0 < result.latency_p50_ms <= result.latency_p90_ms
    data = result.as_dict()
    assert data["batch_size"] == BATCH and data["seq_len"] == SEQ and data["backend"] == "eager"
    assert data["threads"] == torch.get_num_threads() and data["description"] == eager_session.description


# ----------------------------------------------------------------------------------------------- native


def test_pt2e_quantizes_exactly_the_listed_linears_with_the_stored_int8_weights(artifacts):
    """Unlisted Linears (here the 2-output QA head) stay fp32; listed ones run the artifact's int8 values."""
    artifact = load_artifact(artifacts["dynamic_int8"])
    listed = artifact.quantized_modules[:3]
    model = PositionalModel(artifact.build_model(), INPUT_NAMES, QA_TASK["output_names"]).eval()
    example = (torch.randint(0, 1000, (2, 8)), torch.ones(2, 8, dtype=torch.long), torch.zeros(2, 8).long())
    converted = quantize_pt2e_model(model, example, listed, dynamic=False, calibration=None)
    assert quantized_linears(converted) == {f"model.{name}" for name in listed}
    stored = artifact.state_dict()
    checked = 0
    for node in converted.graph.nodes:
        weight = node.args[1] if node.target is torch.ops.aten.linear.default else None
        if weight is not None and "dequantize" in str(weight.target):
            module = list(node.meta["nn_module_stack"].values())[-1][0].removeprefix("model.")
            assert torch.equal(getattr(converted, weight.args[0].target), stored[f"{module}.weight"])
            scale = getattr(converted, weight.args[1].target).float()
            torch.testing.assert_close(scale, stored[f"{module}.weight_scale"])  # not max|w| / 127.5
            checked += 1
    assert checked == len(listed)


def test_pt2e_pins_learned_input_ranges_instead_of_calibrating(artifacts):
    """QAT's ranges become the input quantization of each listed Linear; a shared input (query, key and
    value read the same hidden states) takes the union of their ranges."""
    artifact = load_artifact(artifacts["static_int8"])
    listed = artifact.quantized_modules
    query, key, value, output = (
        next(n for n in listed if n.endswith(suffix))
        for suffix in ("query", "key", "value", "attention.output.dense")
    )
    ranges = {name: (-1.0 - i, 2.0 + i) for i, name in enumerate(listed)}
    model = PositionalModel(artifact.build_model(), INPUT_NAMES, QA_TASK["output_names"]).eval()
    example = (torch.randint(0, 1000, (2, 8)), torch.ones(2, 8, dtype=torch.long), torch.zeros(2, 8).long())
    converted = quantize_pt2e_model(model, example, listed, dynamic=False, calibration=None, ranges=ranges)
    scales = {}
    for node in converted.graph.nodes:
        if node.target is torch.ops.aten.linear.default and "dequantize" in str(node.args[0].target):
            module = list(node.meta["nn_module_stack"].values())[-1][0].removeprefix("model.")
            scales[module] = float(node.args[0].args[1])
    assert set(scales) == set(listed)
    lo, hi = min(ranges[n][0] for n in (query, key, value)), max(ranges[n][1] for n in (query, key, value))
    levels = 255 if int8_dot_product() else 127  # 7-bit activations without VNNI
    assert scales[query] == scales[key] == scales[value] == pytest.approx((hi - lo) / levels)
    assert scales[output] == pytest.approx((ranges[output][1] - ranges[output][0]) / levels)


def test_native_fp32_matches_eager(artifacts, qa_inputs, eager_session, eager_reference):
    session = create_session(artifacts["none"], "native", batch_size=BATCH, seq_len=SEQ)
    assert "fp32" in session.description and "freezing" in session.description
    got = session.run(qa_inputs)
    for name, want in eager_reference.items():
        torch.testing.assert_close(got[name], want, atol=1e-4, rtol=0)
    graphs = counters["stats"]["unique_graphs"]
    small = {k: v[:2, :10] for k, v in qa_inputs.items()}
    padded, unpadded = session.run(small), eager_session.run(small)
    assert counters["stats"]["unique_graphs"] == graphs, "a smaller input must not recompile"
    for name, want in unpadded.items():
        assert padded[name].shape == (2, 10)
        torch.testing.assert_close(padded[name], want, atol=1e-4, rtol=0)


def test_each_session_compiles_its_own_graph_and_unguarded_calls_keep_them_apart(artifacts, qa_inputs):
    """Every session gets its own dynamo cache: at a recompile limit of 1, a second compiled model of the
    same class still compiles (no silent eager fallback); warm calls skip the guards and each session,
    called in turn, still runs its own graph."""
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(recompile_limit=1):
        fp32, bf16 = (  # two PositionalModels: one forward, one code object
            create_session(artifacts[scheme], "native", batch_size=BATCH, seq_len=SEQ)
            for scheme in ("none", "bf16")
        )
        first = fp32.run(qa_inputs), bf16.run(qa_inputs)
        again = fp32.run(qa_inputs), bf16.run(qa_inputs)
    assert counters["stats"]["unique_graphs"] == graphs + 2
    assert not torch.equal(first[0]["start_logits"], first[1]["start_logits"])
    for before, after in zip(first, again, strict=True):
        for name in before:
            torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["static_int8", "dynamic_int8", "bf16"])
def test_native_low_precision_is_close_to_eager(scheme, artifacts, qa_inputs, tokenizer, qa_model, tmp_path):
    session = create_session(artifacts[scheme], "native", batch_size=BATCH, seq_len=SEQ)
    expected = {"static_int8": "static int8", "dynamic_int8": "dynamic int8", "bf16": "bf16"}[scheme]
    assert expected in session.description
    # without VNNI (AVX2), full-range uint8 activations saturate oneDNN's int16 sums: cosine 0.967, not 0.996
    assert ("7-bit activations" in session.description) is (scheme != "bf16" and not int8_dot_product())
    # Compare against eager on the very weights this artifact stores (int8 ones are dequantized).
    reference = create_session(artifacts[scheme], "eager", batch_size=BATCH, seq_len=SEQ).run(qa_inputs)
    got = session.run(qa_inputs)
    mask = qa_inputs["attention_mask"]
    similarity = cosine(valid(got, mask), valid(reference, mask))
    print(f"{scheme}: cosine vs eager {similarity:.6f}")
    assert similarity >= 0.99
    assert not torch.equal(got["start_logits"], reference["start_logits"]), "low precision did not run"
    assert all(torch.isfinite(v).all() for v in got.values())


def test_static_int8_without_calibration_is_refused(artifacts):
    with pytest.raises(BackendError, match="calibration"):
        create_session(artifacts["static_no_calib"], "native", batch_size=BATCH, seq_len=SEQ)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("fused", [False, True], ids=["matmuls", "fused"])
def test_bf16_attention_matches_fp32_sdpa(fused, masked):
    """The int8/bf16 backends' attentions (bf16 inputs, fp32 softmax) against fp32 sdpa; padded keys get no
    weight."""
    from fastcpu_runtime.modeling import bf16_attention

    function = functools.partial(bf16_attention, fused=fused)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 16, generator=gen) for _ in range(3))
    mask = None
    if masked:  # sdpa-style boolean mask [batch, 1, query, key]: the last 5 keys of row 1 are padding
        mask = torch.ones(2, 1, 24, 24, dtype=torch.bool)
        mask[1, ..., -5:] = False
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    got, weights = function(torch.nn.Module(), q, k, v, mask, scaling=16**-0.5)
    assert weights is None and got.shape == expected.shape and got.dtype == torch.float32
    assert F.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.9999
    if masked:  # changing a padded value must not change any output
        v[1, :, -5:] += 100.0
        again, _ = function(torch.nn.Module(), q, k, v, mask, scaling=16**-0.5)
        torch.testing.assert_close(again, got, rtol=0, atol=0)
