"""The ipex backend against eager on the tiny QA model (fp32 parity, padding, int8 and bf16 closeness), and,
where IPEX is not installed (the main environment), the error that says how to get it.

IPEX pins torch 2.8, so these parity tests run in the separate IPEX environment (README, .ci/run).
"""

import importlib.util

import pytest
import torch
from conftest import MINILM, compose_config
from families import family_tokenizer, tiny_family_config
from runtime_helpers import (
    BATCH,
    SEQ,
    eager_outputs,
    encoder_linears,
    logits_cosine,
    save,
)
from transformers import AutoModelForQuestionAnswering

from fastcpu.config import ConfigError
from fastcpu.trial import TrialConfig, check_against_teacher
from fastcpu_runtime import BackendError, available_backends, create_session
from fastcpu_runtime.backends.ipex import refuses
from fastcpu_runtime.cpu import fast_bf16

HAVE_IPEX = importlib.util.find_spec("intel_extension_for_pytorch") is not None


@pytest.fixture(scope="module")
def ipex(artifacts):
    """Every parity test needs IPEX; the module itself must still load in the main environment."""
    return pytest.importorskip("intel_extension_for_pytorch")


# ------------------------------------------------------------------------------------ without IPEX


@pytest.mark.skipif(HAVE_IPEX, reason="IPEX is installed in this environment")
def test_missing_ipex_says_how_to_get_it(artifacts):
    assert "ipex" not in available_backends()
    with pytest.raises(BackendError) as info:
        create_session(artifacts["none"], "ipex", batch_size=1, seq_len=8)
    message = str(info.value)
    assert "'ipex'" in message and "intel_extension_for_pytorch not installed" in message
    assert '-c constraints/ipex.txt -e ".[dev,ipex]"' in message


# --------------------------------------------------------------------------------------- with IPEX


def test_ipex_is_available(ipex):
    assert "ipex" in available_backends()


def test_fp32_matches_eager_and_pads_smaller_batches(ipex, artifacts, qa_inputs):
    session = create_session(artifacts["none"], "ipex", batch_size=BATCH, seq_len=SEQ)
    assert session.description == f"ipex {ipex.__version__.split('+')[0]} fp32 (torch.jit, freeze)"
    small = {k: v[:2, :10] for k, v in qa_inputs.items()}  # fewer rows and a shorter sequence
    for inputs in (qa_inputs, small):
        got, want = session.run(inputs), eager_outputs(artifacts["none"], inputs)
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            assert got[name].shape == tensor.shape and got[name].dtype == torch.float32
            torch.testing.assert_close(got[name], tensor, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("scheme", "expected", "threshold"),
    [("static_int8", "static int8", 0.99), ("dynamic_int8", "dynamic int8", 0.99), ("bf16", "bf16", 0.999)],
)
def test_low_precision_is_close_to_eager(ipex, scheme, expected, threshold, artifacts, qa_inputs):
    if scheme == "bf16" and not fast_bf16():
        with pytest.raises(BackendError, match="ipex bf16 packs its weights with AVX-512"):
            create_session(artifacts[scheme], "ipex", batch_size=BATCH, seq_len=SEQ)
        return
    session = create_session(artifacts[scheme], "ipex", batch_size=BATCH, seq_len=SEQ)
    assert f" {expected} (torch.jit, freeze)" in session.description
    got, reference = session.run(qa_inputs), eager_outputs(artifacts[scheme], qa_inputs)
    similarity = logits_cosine(got, reference, qa_inputs["attention_mask"])
    print(f"ipex {scheme}: cosine vs eager {similarity:.6f}")
    assert similarity >= threshold
    assert not torch.equal(got["start_logits"], reference["start_logits"]), "low precision did not run"
    assert all(torch.isfinite(v).all() for v in got.values())


def test_static_int8_without_calibration_is_refused(ipex, artifacts):
    with pytest.raises(BackendError, match="calibration"):
        create_session(artifacts["static_no_calib"], "ipex", batch_size=BATCH, seq_len=SEQ)


def test_ipex_refuses_static_int8_deberta_only():
    """The one family x scheme pair whose IPEX graph segfaults; the others must stay allowed."""
    assert "segmentation fault" in refuses("deberta-v2", "static_int8")
    assert refuses("deberta-v2", "qat_int8") is not None
    assert refuses("deberta-v2", "dynamic_int8") is None and refuses("bert", "static_int8") is None


@pytest.fixture(scope="module")
def deberta_static(tmp_path_factory):
    """A tiny DeBERTa-v2 QA model exported in static int8."""
    tokenizer = family_tokenizer("deberta-v2", MINILM)
    model = AutoModelForQuestionAnswering.from_config(tiny_family_config("deberta-v2", tokenizer)).eval()
    path = tmp_path_factory.mktemp("deberta") / "static"
    return save(path, model, tokenizer, scheme="static_int8", modules=encoder_linears(model))


def test_static_int8_deberta_is_refused_by_the_session_and_the_trial(ipex, deberta_static):
    """One sentence naming the family and the backends that can, where IPEX would kill the process."""
    with pytest.raises(BackendError, match=r"cannot run deberta-v2 models in static_int8: .*can: .*native"):
        create_session(deberta_static, "ipex", batch_size=BATCH, seq_len=SEQ)
    overrides = ["runtime=ipex", "quantization=static_int8", "student.layers=[0,2]"]  # it has 3 layers
    config = TrialConfig.from_hydra(compose_config(overrides))
    teacher = tiny_family_config("deberta-v2", family_tokenizer("deberta-v2", MINILM))
    with pytest.raises(ConfigError, match=r"^runtime.backend=ipex: backend 'ipex' cannot run deberta-v2"):
        check_against_teacher(config, teacher)
