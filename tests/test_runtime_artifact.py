"""Artifact format: atomic writing, verified loading, and faithful model reconstruction (no compilation)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runtime_helpers import (
    CLS_TASK,
    INPUT_NAMES,
    QA_TASK,
    encode_pairs,
    encoder_linears,
    int8_state,
    save,
    tiny_runtime_model,
)
from transformers import BertForQuestionAnswering, BertForSequenceClassification

from fastcpu_runtime import (
    Artifact,
    ArtifactError,
    dequantize_per_channel,
    load_artifact,
    quantize_per_channel,
    write_artifact,
)


@pytest.fixture(scope="module")
def qa_model() -> BertForQuestionAnswering:
    return tiny_runtime_model(BertForQuestionAnswering)


@pytest.fixture(scope="module")
def cls_model() -> BertForSequenceClassification:
    return tiny_runtime_model(BertForSequenceClassification, seed=1, num_labels=3)


@pytest.fixture(scope="module")
def batch(tokenizer) -> dict[str, torch.Tensor]:
    return encode_pairs(tokenizer, 3)


def outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {k: v for k, v in model(**batch).items() if isinstance(v, torch.Tensor)}


def assert_outputs_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip_preserves_state_manifest_and_calibration(tmp_path, qa_model, tokenizer, batch):
    path = save(tmp_path / "art", qa_model, tokenizer, calibration=batch)
    artifact = load_artifact(path)
    assert isinstance(artifact, Artifact)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "fastcpu-artifact" and manifest["format_version"] == 1
    assert manifest["created"] and manifest["fastcpu_version"]
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {"config.json", "model.safetensors", "calibration.safetensors"} <= on_disk
    assert artifact.input_names == INPUT_NAMES and artifact.output_names == QA_TASK["output_names"]
    assert artifact.scheme == "none" and artifact.manifest["sparsity"]["pattern"] == "none"
    assert artifact.model_config["architectures"] == ["BertForQuestionAnswering"]
    stored = artifact.state_dict()
    expected = qa_model.state_dict()
    assert stored.keys() == expected.keys()
    assert all(torch.equal(stored[k], expected[k]) for k in expected)
    calibration = artifact.calibration()
    assert all(torch.equal(calibration[k], batch[k]) for k in INPUT_NAMES)
    assert artifact.tokenizer()("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]


def test_fastcpu_version_is_taken_from_manifest(tmp_path, cls_model, tokenizer):
    manifest = {
        "model_type": "bert",
        "task": CLS_TASK,
        "quantization": {"scheme": "none"},
        "fastcpu_version": "9.9",
    }
    path = write_artifact(
        tmp_path / "a",
        manifest=manifest,
        model_config=cls_model.config.to_dict(),
        state_dict=cls_model.state_dict(),
        tokenizer=tokenizer,
    )
    artifact = load_artifact(path)
    assert artifact.manifest["fastcpu_version"] == "9.9"
    assert artifact.calibration() is None and artifact.manifest["quantization"]["modules"] == []


@pytest.mark.parametrize("kind", ["qa", "cls"])
def test_eager_model_matches_original_fp32(tmp_path, kind, qa_model, cls_model, tokenizer, batch):
    model, task = (qa_model, QA_TASK) if kind == "qa" else (cls_model, CLS_TASK)
    rebuilt = load_artifact(save(tmp_path / kind, model, tokenizer, task=task)).build_model()
    assert not rebuilt.training and type(rebuilt) is type(model)
    assert_outputs_close(outputs(rebuilt, batch), outputs(model, batch), atol=1e-5)


def test_bf16_artifact_upcasts_to_the_rounded_weights(tmp_path, qa_model, tokenizer, batch):
    state = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in qa_model.state_dict().items()
    }
    artifact = load_artifact(save(tmp_path / "bf16", qa_model, tokenizer, scheme="bf16", state=state))
    assert artifact.state_dict()["qa_outputs.weight"].dtype == torch.bfloat16
    reference = BertForQuestionAnswering._from_config(qa_model.config, attn_implementation="sdpa").eval()
    reference.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    rebuilt = artifact.build_model()
    assert rebuilt.qa_outputs.weight.dtype == torch.float32
    assert_outputs_close(outputs(rebuilt, batch), outputs(reference, batch), atol=1e-5)
    assert artifact.build_model(torch.bfloat16).qa_outputs.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- int8


def test_quantize_per_channel_contract():
    weight = torch.randn(5, 7)
    weight[2] = 0.0
    q, scale = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (5,)
    rows = [0, 1, 3, 4]
    torch.testing.assert_close(scale[rows], weight[rows].abs().amax(dim=1) / 127)
    assert scale[2] == 1.0 and not q[2].any()
    assert q.abs().max() == 127
    error = (dequantize_per_channel(q, scale) - weight).abs()
    assert torch.all(error <= scale[:, None] / 2 + 1e-7)


def test_int8_artifact_dequantizes_exactly(tmp_path, qa_model, tokenizer, batch):
    modules = encoder_linears(qa_model)
    state = int8_state(qa_model, modules)
    artifact = load_artifact(
        save(tmp_path / "int8", qa_model, tokenizer, scheme="static_int8", modules=modules, state=state)
    )
    assert artifact.quantized_modules == modules
    assert artifact.state_dict()[f"{modules[0]}.weight"].dtype == torch.int8
    rebuilt = artifact.build_model()
    expected = dequantize_per_channel(state[f"{modules[0]}.weight"], state[f"{modules[0]}.weight_scale"])
    assert torch.equal(rebuilt.get_submodule(modules[0]).weight, expected)
    assert torch.equal(rebuilt.qa_outputs.weight, qa_model.qa_outputs.weight)  # unlisted: untouched fp32
    reference = BertForQuestionAnswering._from_config(qa_model.config, attn_implementation="sdpa").eval()
    ref_state = dict(qa_model.state_dict())
    for name in modules:
        ref_state[f"{name}.weight"] = dequantize_per_channel(
            state[f"{name}.weight"], state[f"{name}.weight_scale"]
        )
    reference.load_state_dict(ref_state)
    assert_outputs_close(outputs(rebuilt, batch), outputs(reference, batch), atol=1e-5)


def test_quantized_module_without_scale_is_refused(tmp_path, qa_model, tokenizer):
    modules = encoder_linears(qa_model)[:1]
    state = int8_state(qa_model, modules)
    del state[f"{modules[0]}.weight_scale"]
    with pytest.raises(ArtifactError, match="weight_scale"):
        save(tmp_path / "bad", qa_model, tokenizer, scheme="static_int8", modules=modules, state=state)


def test_activation_ranges_must_cover_every_quantized_module(tmp_path, qa_model, tokenizer):
    modules = encoder_linears(qa_model)[:2]
    path = save(tmp_path / "qat", qa_model, tokenizer, scheme="qat_int8", modules=modules)
    manifest = json.loads((path / "manifest.json").read_text())
    assert load_artifact(path).activation_ranges is None  # none learned: the backends calibrate
    manifest["quantization"]["activation_ranges"] = {modules[0]: [-1.5, 2.0]}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"quantization.activation_ranges lacks \['bert.encoder"):
        _ = load_artifact(path).activation_ranges
    manifest["quantization"]["activation_ranges"][modules[1]] = [-3, 1]
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert load_artifact(path).activation_ranges == {modules[0]: (-1.5, 2.0), modules[1]: (-3.0, 1.0)}


# ------------------------------------------------------------------------------------------- pruning


def test_compacted_shapes_load_and_match_zeroed_reference(tmp_path, qa_model, tokenizer, batch):
    """Heads 2-3 of layer 0 and half the FFN neurons of layer 1 physically removed == their weights zeroed."""
    head_dim, keep_heads, keep_ffn = 16, 2, 64
    state = {k: v.clone() for k, v in qa_model.state_dict().items()}
    attn = "bert.encoder.layer.0.attention"
    for proj in ("query", "key", "value"):
        for suffix in ("weight", "bias"):
            key = f"{attn}.self.{proj}.{suffix}"
            state[key] = state[key][: keep_heads * head_dim].clone()
    state[f"{attn}.output.dense.weight"] = state[f"{attn}.output.dense.weight"][
        :, : keep_heads * head_dim
    ].clone()
    ffn = "bert.encoder.layer.1"
    for suffix in ("weight", "bias"):
        key = f"{ffn}.intermediate.dense.{suffix}"
        state[key] = state[key][:keep_ffn].clone()
    state[f"{ffn}.output.dense.weight"] = state[f"{ffn}.output.dense.weight"][:, :keep_ffn].clone()

    rebuilt = load_artifact(save(tmp_path / "pruned", qa_model, tokenizer, state=state)).build_model()
    assert rebuilt.get_submodule(f"{attn}.self.query").weight.shape == (32, 64)
    assert rebuilt.get_submodule(f"{ffn}.intermediate.dense").weight.shape == (64, 64)

    reference = BertForQuestionAnswering._from_config(qa_model.config, attn_implementation="sdpa").eval()
    ref_state = {k: v.clone() for k, v in qa_model.state_dict().items()}
    ref_state[f"{attn}.output.dense.weight"][:, keep_heads * head_dim :] = 0
    ref_state[f"{ffn}.output.dense.weight"][:, keep_ffn:] = 0
    reference.load_state_dict(ref_state)
    assert_outputs_close(outputs(rebuilt, batch), outputs(reference, batch), atol=1e-5)


# ---------------------------------------------------------------------------------------- verification


@pytest.fixture
def artifact_dir(tmp_path, cls_model, tokenizer) -> Path:
    return save(tmp_path / "art", cls_model, tokenizer, task=CLS_TASK)


def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nope")


def test_missing_manifest(artifact_dir):
    (artifact_dir / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_artifact(artifact_dir)


def test_unparsable_manifest(artifact_dir):
    (artifact_dir / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="cannot be parsed"):
        load_artifact(artifact_dir)


def test_changed_bytes_fail_the_checksum(artifact_dir):
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    weights = artifact_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch for model.safetensors") as info:
        load_artifact(artifact_dir)
    message = str(info.value)
    assert manifest["files"]["model.safetensors"] in message and "re-export" in message


def test_missing_listed_file(artifact_dir):
    (artifact_dir / "config.json").unlink()
    with pytest.raises(ArtifactError, match="config.json listed in the manifest is missing"):
        load_artifact(artifact_dir)


def test_unsupported_format_version(artifact_dir):
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    manifest["format_version"] = 2
    (artifact_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format_version 2"):
        load_artifact(artifact_dir)


# --------------------------------------------------------------------------------------- atomic write


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_non_tensor_value_leaves_nothing(tmp_path, cls_model, tokenizer):
    state = {**cls_model.state_dict(), "bogus": [1, 2, 3]}
    with pytest.raises(ArtifactError, match="bogus"):
        save(tmp_path / "art", cls_model, tokenizer, task=CLS_TASK, state=state)
    assert leftovers(tmp_path) == []


def test_crash_mid_write_leaves_no_complete_looking_directory(tmp_path, cls_model, tokenizer):
    class ExplodingTokenizer:
        def save_pretrained(self, directory: str) -> None:
            (Path(directory) / "tokenizer.json").write_text("{}")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save(tmp_path / "art", cls_model, ExplodingTokenizer(), task=CLS_TASK)
    assert leftovers(tmp_path) == []


def test_refuses_to_overwrite_unless_asked(tmp_path, cls_model, tokenizer):
    path = save(tmp_path / "art", cls_model, tokenizer, task=CLS_TASK)
    created = json.loads((path / "manifest.json").read_text())["files"]
    with pytest.raises(ArtifactError, match="overwrite=True"):
        save(path, cls_model, tokenizer, task=CLS_TASK)
    (path / "stale.txt").write_text("old")
    save(path, cls_model, tokenizer, task=CLS_TASK, overwrite=True)
    assert not (path / "stale.txt").exists()
    assert json.loads((path / "manifest.json").read_text())["files"] == created
    assert leftovers(tmp_path) == ["art"]
    load_artifact(path)


def test_empty_existing_directory_is_fine(tmp_path, cls_model, tokenizer):
    (tmp_path / "art").mkdir()
    load_artifact(save(tmp_path / "art", cls_model, tokenizer, task=CLS_TASK))


def test_invalid_manifest_is_refused(tmp_path, cls_model, tokenizer):
    with pytest.raises(ArtifactError, match="scheme"):
        save(tmp_path / "art", cls_model, tokenizer, task=CLS_TASK, scheme="int4")
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------- packaging


def test_runtime_does_not_import_training_libraries():
    code = (
        "import fastcpu_runtime, sys; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'datasets','optuna','mlflow','hydra'}); "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
