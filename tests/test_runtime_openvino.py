"""The openvino backends against eager on the tiny QA model: fp32 parity with padding, NNCF static int8
close to eager and really int8, and fp32 forced on an int8 artifact at torch's thread count.

Each session converts the model (and int8 calibrates it), a few seconds for this tiny model.
"""

import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

import torch  # noqa: E402
from runtime_helpers import BATCH, SEQ, eager_outputs, logits_cosine  # noqa: E402

from fastcpu_runtime import Session, available_backends, create_session, load_artifact  # noqa: E402
from fastcpu_runtime.backends import get_backend  # noqa: E402


def test_both_names_are_available():
    assert {"openvino", "openvino_fp32"} <= set(available_backends())


def test_fp32_matches_eager_and_pads_smaller_batches(artifacts, qa_inputs):
    session = create_session(artifacts["none"], "openvino_fp32", batch_size=BATCH, seq_len=SEQ)
    assert session.description.startswith("openvino 2") and session.description.endswith(" f32")
    reference = eager_outputs(artifacts["none"], qa_inputs)
    got = session.run(qa_inputs)
    assert got.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-4, rtol=0)
    small = {k: v[:2, :10] for k, v in qa_inputs.items()}  # fewer rows and a shorter sequence
    assert session.run(small)["start_logits"].shape == (2, 10)


def test_static_int8_is_close_to_eager_and_quantized(artifacts, qa_inputs):
    session = create_session(artifacts["static_int8"], "openvino", batch_size=BATCH, seq_len=SEQ)
    assert "static int8 (NNCF PTQ" in session.description
    got, reference = session.run(qa_inputs), eager_outputs(artifacts["static_int8"], qa_inputs)
    similarity = logits_cosine(got, reference, qa_inputs["attention_mask"])
    print(f"openvino static int8: cosine vs eager {similarity:.6f}")
    assert similarity >= 0.99
    runtime_model = get_backend("openvino")(load_artifact(artifacts["static_int8"]), BATCH, SEQ).fn.compiled
    runtime_model = runtime_model.get_runtime_model()
    precisions = {op.get_rt_info()["runtimePrecision"].astype(str) for op in runtime_model.get_ops()}
    assert "i8" in precisions or "u8" in precisions, f"no int8 op ran: {sorted(precisions)}"


def test_fp32_name_forces_fp32_at_the_torch_thread_count(artifacts, qa_inputs):
    artifact = load_artifact(artifacts["dynamic_int8"])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        runner = get_backend("openvino_fp32")(artifact, BATCH, SEQ)
    finally:
        torch.set_num_threads(before)
    assert runner.fn.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    session = Session(artifact, "openvino_fp32", runner, BATCH, SEQ)
    assert session.description.endswith("f32 (int8 weights dequantized)")
    reference = eager_outputs(artifacts["dynamic_int8"], qa_inputs)
    got = session.run(qa_inputs)
    torch.testing.assert_close(got["start_logits"], reference["start_logits"], atol=1e-4, rtol=0)
