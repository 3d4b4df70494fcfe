"""The onnxruntime backends against eager on the tiny QA model: fp32 parity, padding, dynamic int8 of exactly
the listed Linears with the stored int8 weights, and forcing fp32 on an int8 artifact.

Each session exports the model to ONNX (about a second for this tiny model), so there is one per case.
"""

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402  (after the skips: onnxscript brings onnx)
import torch  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from runtime_helpers import (  # noqa: E402
    BATCH,
    SEQ,
    eager_outputs,
    logits_cosine,
)

from fastcpu_runtime import Session, available_backends, create_session, load_artifact  # noqa: E402
from fastcpu_runtime.backends import get_backend  # noqa: E402
from fastcpu_runtime.backends.onnxruntime import (  # noqa: E402
    count_int8_matmuls,
    export_onnx,
    linear_nodes,
    quantize_int8,
)
from fastcpu_runtime.cpu import int8_dot_product  # noqa: E402


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape and got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], tensor, atol=1e-4, rtol=0)


def test_both_names_are_available():
    assert {"onnxruntime", "onnxruntime_fp32"} <= set(available_backends())


def test_fp32_matches_eager_and_pads_smaller_batches(artifacts, qa_inputs):
    session = create_session(artifacts["none"], "onnxruntime", batch_size=BATCH, seq_len=SEQ)
    assert session.description.startswith("onnxruntime 1.") and session.description.endswith(" fp32")
    assert_close(session.run(qa_inputs), eager_outputs(artifacts["none"], qa_inputs))
    small = {k: v[:2, :10] for k, v in qa_inputs.items()}  # fewer rows and a shorter sequence
    got = session.run(small)
    assert got["start_logits"].shape == (2, 10)
    assert_close(got, eager_outputs(artifacts["none"], small))


def test_dynamic_int8_is_close_to_eager(artifacts, qa_inputs):
    session = create_session(artifacts["dynamic_int8"], "onnxruntime", batch_size=BATCH, seq_len=SEQ)
    assert "dynamic int8 (per-channel)" in session.description
    got, reference = session.run(qa_inputs), eager_outputs(artifacts["dynamic_int8"], qa_inputs)
    similarity = logits_cosine(got, reference, qa_inputs["attention_mask"])
    print(f"onnxruntime dynamic int8: cosine vs eager {similarity:.6f}")
    assert similarity >= 0.99
    assert not torch.equal(got["start_logits"], reference["start_logits"]), "int8 did not run"


def test_int8_quantizes_exactly_the_listed_linears_to_the_stored_weights(artifacts, tmp_path):
    """Unlisted Linears (here the QA head and most encoder ones) stay fp32; symmetric per-channel
    quantization of the dequantized weights gives back the artifact's int8 values and scales (with VNNI;
    without it, 7-bit weights as close to them as 7 bits allow)."""
    artifact = load_artifact(artifacts["dynamic_int8"])
    listed = artifact.quantized_modules[:3]
    fp32_path = export_onnx(artifact, 2, 8, tmp_path / "fp32.onnx")
    fp32_graph = onnx.load(str(fp32_path), load_external_data=False)
    weight_of = {node.name: node.input[1] for node in fp32_graph.graph.node if node.op_type == "MatMul"}
    nodes = linear_nodes(fp32_graph, listed)
    int8_graph = onnx.load(str(quantize_int8(fp32_path, tmp_path / "int8.onnx", listed)))
    assert count_int8_matmuls(int8_graph) == len(listed)
    initializers = {init.name: numpy_helper.to_array(init) for init in int8_graph.graph.initializer}
    stored = artifact.state_dict()
    for module, node in zip(listed, nodes, strict=True):
        weight = torch.from_numpy(initializers[f"{weight_of[node]}_quantized"].copy())
        scale = torch.from_numpy(initializers[f"{weight_of[node]}_scale"].copy())
        stored_weight, stored_scale = stored[f"{module}.weight"], stored[f"{module}.weight_scale"]
        if int8_dot_product():
            assert torch.equal(weight.T, stored_weight)  # ONNX MatMul holds W^T [in, out]
            torch.testing.assert_close(scale, stored_scale)
        else:  # 7-bit weights against saturation: the stored ones within half a step of each grid
            assert weight.abs().max() <= 64
            error = (weight.T.float() * scale[:, None] - stored_weight.float() * stored_scale[:, None]).abs()
            assert (error <= (scale + stored_scale)[:, None] / 2 + 1e-6).all()


def test_static_int8_artifact_runs_dynamic_int8_and_says_so(artifacts):
    """ONNX Runtime's peer baseline is dynamic quantization; it needs no calibration set."""
    session = create_session(artifacts["static_int8"], "onnxruntime", batch_size=1, seq_len=8)
    assert "dynamic int8 (per-channel; artifact scheme static_int8)" in session.description


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [("dynamic_int8", "fp32 (int8 weights dequantized)"), ("bf16", "fp32 (bf16 weights upcast")],
)
def test_fp32_name_forces_fp32_at_the_torch_thread_count(scheme, expected, artifacts, qa_inputs):
    artifact = load_artifact(artifacts[scheme])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        runner = get_backend("onnxruntime_fp32")(artifact, BATCH, SEQ)
    finally:
        torch.set_num_threads(before)
    assert runner.fn.session.get_session_options().intra_op_num_threads == 1
    session = Session(artifact, "onnxruntime_fp32", runner, BATCH, SEQ)
    assert expected in session.description
    assert_close(session.run(qa_inputs), eager_outputs(artifacts[scheme], qa_inputs))
