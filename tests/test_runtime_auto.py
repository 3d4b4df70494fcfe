"""The `auto` backend: pick_backend on real synthetic artifacts (cheap: it reads only the int8 weights), and
one session created with the default backend end to end."""

from pathlib import Path

import pytest
import torch
from runtime_helpers import BATCH, SEQ, logits_cosine

from fastcpu_runtime import AUTO, auto, available_backends, create_session, load_artifact, pick_backend
from fastcpu_runtime.auto import (
    SPARSE_MIN_BLOCK_SPARSITY,
    block_sparsity_4x1,
    int8_block_sparsity,
    sparse_pays_off,
)
from fastcpu_runtime.synthetic import synthetic_model, write_synthetic_artifact

# sparse needs x86 and a C++ compiler, and auto prefers native's dense int8 on a CPU with AMX int8
SPARSE = "sparse" if "sparse" in available_backends() and sparse_pays_off() else "native"
THRESHOLD = f"{SPARSE_MIN_BLOCK_SPARSITY:.2f}"
CASES = {  # name: (sparsity, pattern, scheme)
    "int8_4x1": (0.8, "4x1", "static_int8"),
    "int8_dense": (0.0, "4x1", "static_int8"),
    "dynamic_4x1": (0.8, "4x1", "dynamic_int8"),
    "bf16_4x1": (0.8, "4x1", "bf16"),
    "fp32": (0.0, "4x1", "none"),
    # 80% of single weights zeroed leaves about 0.8^4 = 0.41 of the 4x1 blocks all zero
    "int8_unstructured": (0.8, "unstructured", "static_int8"),
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root, model = tmp_path_factory.mktemp("auto"), synthetic_model("tiny")
    return {
        name: write_synthetic_artifact(
            root / name, model, tokenizer, sparsity=sparsity, pattern=pattern, scheme=scheme, seq_len=SEQ
        )
        for name, (sparsity, pattern, scheme) in CASES.items()
    }


def test_block_sparsity_counts_all_zero_4x1_blocks_with_padded_rows():
    weight = torch.ones(6, 3, dtype=torch.int8)  # blocks: rows 0-3 and rows 4-5 plus 2 zero padding rows
    weight[0:4, 0] = 0  # a whole block
    weight[0:3, 1] = 0  # 3 of 4 rows: not a zero block
    weight[4:6, 2] = 0  # the padded block's real rows
    assert block_sparsity_4x1(weight) == (2, 6)
    assert block_sparsity_4x1(torch.zeros(8, 5)) == (10, 10)


@pytest.mark.parametrize(
    ("case", "backend", "reason"),
    [
        ("int8_4x1", SPARSE, f"4x1 block sparsity 0.80 of the int8 Linears >= {THRESHOLD}"),
        ("dynamic_4x1", SPARSE, f"4x1 block sparsity 0.80 of the int8 Linears >= {THRESHOLD}"),
        ("int8_dense", "native", f"4x1 block sparsity 0.00 of the int8 Linears < {THRESHOLD}"),
        ("int8_unstructured", "native", f"4x1 block sparsity 0.41 of the int8 Linears < {THRESHOLD}"),
        ("bf16_4x1", "native", "scheme bf16 is not int8"),
        ("fp32", "native", "scheme none is not int8"),
    ],
)
def test_pick_backend(artifacts, case, backend, reason):
    name, why = pick_backend(load_artifact(artifacts[case]))
    assert name == backend and why.startswith(reason), (name, why)


@pytest.mark.skipif(
    "sparse" not in available_backends(), reason="the sparse backend needs x86 and a compiler"
)
@pytest.mark.parametrize(
    ("flags", "backend", "why"),
    [
        ({"avx512_vnni"}, "sparse", ""),
        (
            {"avx512_vnni", "amx_tile", "amx_int8"},
            "native",
            ", but this CPU has AMX int8, where dense int8 beats",
        ),
    ],
)
def test_block_sparse_int8_goes_to_native_on_a_cpu_with_amx(artifacts, monkeypatch, flags, backend, why):
    """The CPU's flags decide between the VNNI sparse kernels and native's AMX dense int8."""
    monkeypatch.setattr(auto, "cpu_flags", lambda: frozenset(flags))
    name, reason = pick_backend(load_artifact(artifacts["int8_4x1"]))
    assert name == backend and reason.startswith(
        f"4x1 block sparsity 0.80 of the int8 Linears >= {THRESHOLD}{why}"
    )


def test_unstructured_int8_has_few_all_zero_blocks(artifacts):
    sparsity = int8_block_sparsity(load_artifact(artifacts["int8_unstructured"]))
    assert 0.3 < sparsity < SPARSE_MIN_BLOCK_SPARSITY  # 0.41: independent zeros rarely fill a block
    assert int8_block_sparsity(load_artifact(artifacts["bf16_4x1"])) is None  # no int8 Linears


def test_default_backend_is_auto_and_says_what_it_chose(artifacts, qa_inputs):
    session = create_session(artifacts["int8_4x1"], batch_size=BATCH, seq_len=SEQ)  # backend=AUTO
    _, reason = pick_backend(session.artifact)
    assert session.backend == SPARSE
    assert session.description.startswith(f"{AUTO} -> {SPARSE}: {reason}; {SPARSE} static int8")
    got = session.run(qa_inputs)
    want = create_session(artifacts["int8_4x1"], "eager", batch_size=BATCH, seq_len=SEQ).run(qa_inputs)
    assert all(got[name].shape == tensor.shape for name, tensor in want.items())
    assert logits_cosine(got, want, qa_inputs["attention_mask"]) >= 0.99
