"""The sparse backend: a 4x1-pruned int8 tiny BERT run on the block-sparse kernel inside torch.compile.

Each sparse/native session compiles (seconds), so sessions are module-scoped and shared between tests.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from runtime_helpers import (
    BATCH,
    SEQ,
    encode,
    encoder_linears,
    save,
    tiny_runtime_model,
)
from torch._dynamo.utils import counters
from transformers import BertForQuestionAnswering

from fastcpu.pruning import magnitude_mask
from fastcpu_runtime import BackendError, available_backends, create_session, load_artifact
from fastcpu_runtime.backends.sparse import (
    FUSION_ENV,
    SparseInt8Linear,
    quantize_uint8,
    sparse_available,
    sparse_linear_op,
)
from fastcpu_runtime.kernels import (
    available_paths,
    pack_4x1,
    pack_linear,
    sparse_int8_gemm,
    sparse_linear,
    stack_rows,
)

pytestmark = pytest.mark.skipif(not sparse_available(), reason="sparse needs x86 and a C++ compiler")

CALIBRATION_TEXTS = [
    "The committee approved the budget after a long debate.",
    "Rainfall in the valley doubled compared with last spring.",
    "She tuned the violin before the concert started.",
    "Engineers replaced the bridge cables during the night.",
]
SPARSITY = 0.8


@pytest.fixture(scope="module")
def pruned_model() -> BertForQuestionAnswering:
    """Tiny QA BERT (large init so int8 error shows) with every encoder Linear pruned to 80% 4x1 blocks."""
    model = tiny_runtime_model(BertForQuestionAnswering, initializer_range=0.2)
    with torch.no_grad():
        for name in encoder_linears(model):
            weight = model.get_submodule(name).weight
            weight.mul_(magnitude_mask(weight, SPARSITY, "4x1"))
    return model


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, pruned_model, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sparse_artifacts")
    modules = encoder_linears(pruned_model)
    calibration = encode(tokenizer, CALIBRATION_TEXTS, padding="max_length", max_length=24)
    return {
        "none": save(root / "fp32", pruned_model, tokenizer),
        "static_int8": save(
            root / "static",
            pruned_model,
            tokenizer,
            scheme="static_int8",
            modules=modules,
            calibration=calibration,
        ),
        "dynamic_int8": save(
            root / "dynamic", pruned_model, tokenizer, scheme="dynamic_int8", modules=modules
        ),
    }


@pytest.fixture(scope="module")
def reference(pruned_model, qa_inputs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = pruned_model(**qa_inputs)
    return {"start_logits": out.start_logits, "end_logits": out.end_logits}


@pytest.fixture(scope="module")
def static_session(artifacts):
    return create_session(artifacts["static_int8"], "sparse", batch_size=BATCH, seq_len=SEQ)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_custom_op_matches_the_kernel_and_has_a_fake():
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (8, 16), dtype=torch.int8, generator=gen)
    w[:4, ::2] = 0
    x = torch.randint(0, 256, (5, 16), dtype=torch.uint8, generator=gen)
    scale, bias = torch.rand(8, generator=gen), torch.randn(8, generator=gen)
    packed = pack_4x1(w)
    args = (x, torch.tensor(0.02), torch.tensor(7.0), packed.row_ptr, packed.col_idx, packed.values)
    got = sparse_linear_op(*args, packed.row_sums, scale, bias)
    torch.testing.assert_close(got, sparse_linear(x, 0.02, 7, packed, scale, bias), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.fastcpu.sparse_linear.default, (*args, packed.row_sums, scale, bias))


def test_module_pads_odd_out_features_and_keeps_leading_dims():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randint(-127, 128, (6, 12), dtype=torch.int8, generator=gen)
    scale, bias = torch.rand(6, generator=gen) / 100, torch.randn(6, generator=gen)
    module = SparseInt8Linear(pack_linear(weight), scale, bias, x_range=(-2.0, 3.0))
    x = torch.randn(2, 3, 12, generator=gen)
    q = quantize_uint8(x, module.x_scale, module.x_zero_point)
    expected = (q.float() - module.x_zero_point) * module.x_scale @ (weight.float() * scale[:, None]).T + bias
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)


def test_stacked_packing_computes_each_weight_exactly():
    """[W1; W2; W3] packed as one: its int32 accumulators are each weight's, side by side, whatever
    the densities (an all-zero weight included)."""
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randint(-127, 128, (rows, 20), dtype=torch.int8, generator=gen) for rows in (8, 4, 12)]
    weights[0][:, ::3] = 0
    weights[1].zero_()
    x = torch.randint(0, 256, (7, 20), dtype=torch.uint8, generator=gen)
    stacked = stack_rows([pack_4x1(w) for w in weights])
    assert stacked.out_features == 24 and stacked.in_features == 20
    expected = torch.cat([sparse_int8_gemm(x, pack_4x1(w)) for w in weights], dim=1)
    torch.testing.assert_close(sparse_int8_gemm(x, stacked), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="read different widths"):
        stack_rows([pack_4x1(weights[0]), pack_4x1(weights[0][:, :16])])


def test_merged_query_key_value_gives_the_unmerged_outputs(artifacts, static_session, qa_inputs, monkeypatch):
    """One GEMM for q, k and v per layer (the default) answers as the three separate ones do."""
    layers = load_artifact(artifacts["static_int8"]).model_config["num_hidden_layers"]
    assert f"query/key/value as one GEMM in {layers} layers" in static_session.description
    monkeypatch.setenv(FUSION_ENV, "none")
    separate = create_session(artifacts["static_int8"], "sparse", batch_size=BATCH, seq_len=SEQ)
    assert "one GEMM" not in separate.description
    merged, unmerged = static_session.run(qa_inputs), separate.run(qa_inputs)
    for name in merged:
        torch.testing.assert_close(merged[name], unmerged[name], rtol=1e-5, atol=1e-5)


def test_gelu_epilogue_answers_as_separate_gelu_and_quantize(
    artifacts, static_session, qa_inputs, monkeypatch
):
    """GELU and the second FFN Linear's quantization inside the first one's epilogue (the default) give
    the logits of the graph that runs them as separate ops: the same uint8 values but for rare one-step
    rounding differences of the erf approximation."""
    layers = load_artifact(artifacts["static_int8"]).model_config["num_hidden_layers"]
    assert f"GELU + requantize in the FFN's first GEMM in {layers} layers" in static_session.description
    monkeypatch.setenv(FUSION_ENV, "unguarded")
    separate = create_session(artifacts["static_int8"], "sparse", batch_size=BATCH, seq_len=SEQ)
    assert "GELU" not in separate.description
    fused, unfused = static_session.run(qa_inputs), separate.run(qa_inputs)
    for name in fused:
        assert cosine(fused[name], unfused[name]) >= 0.999, name
        torch.testing.assert_close(fused[name], unfused[name], rtol=0.05, atol=0.05)


def test_unknown_fusion_cap_is_one_clear_error(artifacts, monkeypatch):
    monkeypatch.setenv(FUSION_ENV, "everything")
    with pytest.raises(ValueError, match="FASTCPU_SPARSE_FUSION='everything' is not a fusion step; allowed"):
        create_session(artifacts["static_int8"], "sparse", batch_size=BATCH, seq_len=SEQ)


def test_sparse_is_registered_and_available():
    assert "sparse" in available_backends()


def test_static_sparse_is_close_to_fp32_on_real_text(static_session, qa_inputs, reference):
    assert "block-sparse" in static_session.description
    out = static_session.run(qa_inputs)
    for name, expected in reference.items():
        assert out[name].shape == expected.shape
        assert cosine(out[name], expected) >= 0.99, name


def test_static_sparse_is_deterministic_and_does_not_recompile(static_session, qa_inputs):
    graphs = counters["stats"]["unique_graphs"]
    first = static_session.run(qa_inputs)
    smaller = {name: tensor[:2, :20] for name, tensor in qa_inputs.items()}  # padded inside the session
    second = static_session.run(smaller)
    again = static_session.run(qa_inputs)
    assert counters["stats"]["unique_graphs"] == graphs, "a smaller input must not recompile"
    assert second["start_logits"].shape == (2, 20)
    for name in first:
        torch.testing.assert_close(again[name], first[name], rtol=0, atol=0)


def test_whole_model_is_one_graph_around_the_custom_op(artifacts):
    """dynamo must trace through the op: no graph breaks, and one op node per quantized Linear."""
    from fastcpu_runtime.backends import sparse as backend
    from fastcpu_runtime.backends.native import positional_model
    from fastcpu_runtime.inputs import synthetic_batch

    artifact = load_artifact(artifacts["dynamic_int8"])
    model = positional_model(artifact, torch.float32)
    backend.replace_linears(model.model, artifact.state_dict(), artifact.quantized_modules, None)
    layers = backend.merge_query_key_value(model.model)
    assert layers == artifact.model_config["num_hidden_layers"]
    example = tuple(synthetic_batch(artifact.input_names, 2, 16, artifact.vocab_size).values())
    explanation = torch._dynamo.explain(model)(*example)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    ops = [
        node
        for node in explanation.graphs[0].graph.nodes
        if node.target in (torch.ops.fastcpu.sparse_linear, torch.ops.fastcpu.sparse_linear.default)
    ]
    assert len(ops) == len(artifact.quantized_modules) - 2 * layers  # q, k and v are one op


def test_sparse_is_close_to_native_static_int8(artifacts, static_session, qa_inputs):
    native = create_session(artifacts["static_int8"], "native", batch_size=BATCH, seq_len=SEQ)
    ours, theirs = static_session.run(qa_inputs), native.run(qa_inputs)
    for name in ours:
        assert cosine(ours[name], theirs[name]) >= 0.99, name


def test_dynamic_scheme(artifacts, qa_inputs, reference):
    session = create_session(artifacts["dynamic_int8"], "sparse", batch_size=BATCH, seq_len=SEQ)
    assert session.description.startswith("sparse dynamic int8")
    # each FFN input's range comes from that input, unknown before GELU ran: no GELU epilogue
    assert "GELU" not in session.description
    out = session.run(qa_inputs)
    for name, expected in reference.items():
        assert cosine(out[name], expected) >= 0.99, name


def test_non_int8_artifact_is_refused(artifacts):
    with pytest.raises(BackendError, match="sparse needs an int8 artifact"):
        create_session(artifacts["none"], "sparse", batch_size=BATCH, seq_len=SEQ)


def unpack(module: SparseInt8Linear) -> torch.Tensor:
    """The dense int8 weight a module's 4x1 packing encodes (padding slots hold zeros, so they add 0)."""
    groups = torch.repeat_interleave(torch.arange(len(module.row_ptr) - 1), module.row_ptr.diff().long())
    dense = torch.zeros(module.weight_scale.shape[0], module.in_features, dtype=torch.int32)
    rows = (groups[:, None, None] * 4 + torch.arange(4)[None, :, None]).expand(-1, 4, 4)
    cols = module.col_idx.long()[:, None, :].expand(-1, 4, 4)
    dense.index_put_((rows, cols), module.values.int(), accumulate=True)
    return dense[: module.out_features].to(torch.int8)


def test_block_sparse_int8_export_stores_the_packed_weights(artifacts):
    """Written at export, listed with a checksum, decoding to the stored int8 weights; the session uses it."""
    import json

    from fastcpu_runtime.artifact import PACKED

    artifact = load_artifact(artifacts["static_int8"])
    info = artifact.manifest["quantization"]["packed"]
    assert info["file"] == PACKED and PACKED in artifact.manifest["files"]
    assert info["block_sparsity"] >= SPARSITY - 0.01
    packed, state = artifact.packed_weights(), artifact.state_dict()
    assert set(packed) == set(artifact.quantized_modules)
    for name, weight in packed.items():
        stored = state[f"{name}.weight"]
        torch.testing.assert_close(pack_linear(stored).values, weight.values, rtol=0, atol=0)
        torch.testing.assert_close(pack_linear(stored).col_idx, weight.col_idx, rtol=0, atol=0)
    manifest = json.loads((artifacts["none"] / "manifest.json").read_text())
    assert "packed" not in manifest["quantization"] and PACKED not in manifest["files"]


def test_sparse_session_runs_the_packing_stored_at_export(static_session):
    assert "packed at export" in static_session.description


def test_dense_int8_export_stores_no_packing(tmp_path, tokenizer):
    """Below the block sparsity at which `auto` picks sparse, the packing would only cost space."""
    model = tiny_runtime_model(BertForQuestionAnswering)
    path = save(tmp_path / "dense", model, tokenizer, scheme="dynamic_int8", modules=encoder_linears(model))
    artifact = load_artifact(path)
    assert artifact.packed_weights() is None
    session = create_session(artifact, "sparse", batch_size=BATCH, seq_len=SEQ)
    assert "packed at load" in session.description


def test_corrupted_or_foreign_packing_is_refused(artifacts, tmp_path):
    import json
    import shutil

    from fastcpu_runtime import ArtifactError
    from fastcpu_runtime.artifact import PACKED

    copy = shutil.copytree(artifacts["static_int8"], tmp_path / "copy")
    data = bytearray((copy / PACKED).read_bytes())
    data[-1] ^= 0xFF
    (copy / PACKED).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"checksum mismatch for {PACKED}"):
        load_artifact(copy)
    shutil.copy(artifacts["static_int8"] / PACKED, copy / PACKED)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["quantization"]["packed"]["format"] = "2x2-v9"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="packed weights have format '2x2-v9'"):
        load_artifact(copy).packed_weights()


def test_packed_weights_are_the_stored_int8_weights(artifacts):
    """No requantization: every replaced Linear's packing decodes back to the artifact's int8 tensor."""
    from fastcpu_runtime.backends import sparse as backend

    artifact = load_artifact(artifacts["static_int8"])
    state = artifact.state_dict()
    model = artifact.build_model()
    replaced = backend.replace_linears(model, state, artifact.quantized_modules, None)
    assert len(replaced) == len(artifact.quantized_modules)
    for name, module in zip(artifact.quantized_modules, replaced, strict=True):
        torch.testing.assert_close(unpack(module), state[f"{name}.weight"], rtol=0, atol=0)
        assert module.packed.density <= 1 - SPARSITY + 0.05, name


_CAPPED_RUN = """
import sys, torch
from fastcpu_runtime import create_session
inputs = torch.load(sys.argv[2])
for _ in range(2):  # two sessions: the fallback is said once per process, not per session
    session = create_session(sys.argv[1], "sparse", batch_size=int(sys.argv[3]), seq_len=int(sys.argv[4]))
    out = session.run(inputs)
print(session.description)
torch.save(out, sys.argv[2] + ".out")
"""


def run_capped(artifact: Path, inputs: dict, tmp_path: Path, cap: str):
    import os
    import subprocess
    import sys

    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "FASTCPU_SPARSE_MAX_ISA": cap}
    args = [str(artifact), str(tmp_path / "inputs.pt"), str(BATCH), str(SEQ)]
    return subprocess.run(
        [sys.executable, "-c", _CAPPED_RUN, *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_capped_isa_falls_back_says_so_once_and_agrees(artifacts, static_session, qa_inputs, tmp_path):
    """A CPU without AVX-512 VNNI (emulated by capping the path) runs the AVX2 path, says so once."""
    if "avx2" not in available_paths():
        pytest.skip("needs a CPU with AVX2")
    done = run_capped(artifacts["static_int8"], qa_inputs, tmp_path, "avx2")
    assert done.returncode == 0, done.stderr
    assert "4x1 block-sparse avx2 kernel" in done.stdout
    if "avx512_vnni" in available_paths():
        assert done.stderr.count("falling back to the avx2 path") == 1, done.stderr
    fallback, default = torch.load(tmp_path / "inputs.pt.out"), static_session.run(qa_inputs)
    for name in default:  # the int32 accumulators are exact on every path; the float epilogue may round apart
        torch.testing.assert_close(fallback[name], default[name], rtol=1e-4, atol=1e-4)


def test_unknown_isa_cap_is_one_clear_error(artifacts, qa_inputs, tmp_path):
    done = run_capped(artifacts["static_int8"], qa_inputs, tmp_path, "sse9")
    assert done.returncode != 0
    assert (
        "FASTCPU_SPARSE_MAX_ISA='sse9' is not a kernel path; allowed: avx512_vnni, avx2, scalar"
        in done.stderr
    )


def test_steps_benchmark_times_every_step_against_native(tmp_path):
    """benchmarks/sparse_steps.py on a tiny synthetic artifact: one row per session, in step order, each
    step's ratios taken from the same rounds as the rows they compare."""
    import importlib.util
    import json

    from conftest import ROOT

    from fastcpu_runtime.backends.sparse import FUSION_STEPS

    spec = importlib.util.spec_from_file_location("sparse_steps", ROOT / "benchmarks" / "sparse_steps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--shape", "tiny", "--sparsity", "0.8", "--batch", "2", "--seq", "16", "--rounds", "2"]
    records = module.main([*args, "--iterations", "2", "--json", str(tmp_path / "steps.json")])
    assert [r["session"] for r in records] == ["native", *(f"sparse {step}" for step in FUSION_STEPS)]
    assert json.loads((tmp_path / "steps.json").read_text()) == records
    assert records[1]["vs_previous"] is None
    for row in records[1:]:
        assert row["samples_per_s"]["min"] > 0
        assert row["vs_native"]["min"] <= row["vs_native"]["median"] <= row["vs_native"]["max"]
    with pytest.raises(SystemExit):
        module.main(["--shape", "tiny", "--scheme", "dynamic_int8"])
