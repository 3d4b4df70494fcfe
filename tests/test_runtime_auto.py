"""The `auto` backend: its candidates on real synthetic artifacts (cheap: it reads only the int8 weights),
the timed race between sparse and native, the race's cache beside the artifact, and the fallback when a
candidate cannot be built."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from runtime_helpers import BATCH, SEQ, logits_cosine

from fastcpu_runtime import AUTO, BackendError, auto, available_backends, create_session, load_artifact
from fastcpu_runtime.auto import (
    CHOICES,
    SPARSE_MIN_BLOCK_SPARSITY,
    block_sparsity_4x1,
    candidate_backends,
    int8_block_sparsity,
)
from fastcpu_runtime.synthetic import synthetic_model, write_synthetic_artifact

HAS_SPARSE = "sparse" in available_backends()  # sparse needs x86 and a C++ compiler
needs_sparse = pytest.mark.skipif(not HAS_SPARSE, reason="the sparse backend needs x86 and a compiler")
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
DENSE_INT8 = ["native"]
RACED = ["sparse", *DENSE_INT8] if HAS_SPARSE else DENSE_INT8
# "measured A 12.3 (11.0-13.1) vs B 10.2 (9.8-10.5) samples/s at ..."
SPEED = re.compile(r"(\w+) ([\d.]+) \(([\d.]+)-([\d.]+)\)")
VERDICT = re.compile(rf"measured ({SPEED.pattern}(?: vs {SPEED.pattern})+) samples/s")


def measured_speeds(description: str) -> list[tuple[str, float, float, float]]:
    """(backend, median, low, high) for each candidate of the race, in the verdict's order."""
    match = VERDICT.search(description)
    assert match, description
    return [(name, *map(float, numbers)) for name, *numbers in SPEED.findall(match.group(1))]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root, model = tmp_path_factory.mktemp("auto"), synthetic_model("tiny")
    return {
        name: write_synthetic_artifact(
            root / name, model, tokenizer, sparsity=sparsity, pattern=pattern, scheme=scheme, seq_len=SEQ
        )
        for name, (sparsity, pattern, scheme) in CASES.items()
    }


@pytest.fixture
def sparse_copy(artifacts, tmp_path) -> Path:
    """A private copy of the 80% 4x1 int8 artifact, so each test starts with no recorded race."""
    return shutil.copytree(artifacts["int8_4x1"], tmp_path / "int8_4x1")


def test_block_sparsity_counts_all_zero_4x1_blocks_with_padded_rows():
    weight = torch.ones(6, 3, dtype=torch.int8)  # blocks: rows 0-3 and rows 4-5 plus 2 zero padding rows
    weight[0:4, 0] = 0  # a whole block
    weight[0:3, 1] = 0  # 3 of 4 rows: not a zero block
    weight[4:6, 2] = 0  # the padded block's real rows
    assert block_sparsity_4x1(weight) == (2, 6)
    assert block_sparsity_4x1(torch.zeros(8, 5)) == (10, 10)


@pytest.mark.parametrize(
    ("case", "candidates", "reason"),
    [
        ("int8_4x1", RACED, "4x1 block sparsity 0.80 of the int8 Linears"),
        ("dynamic_4x1", RACED, "4x1 block sparsity 0.80 of the int8 Linears"),
        ("int8_dense", DENSE_INT8, f"4x1 block sparsity 0.00 of the int8 Linears < {THRESHOLD}"),
        ("int8_unstructured", DENSE_INT8, f"4x1 block sparsity 0.41 of the int8 Linears < {THRESHOLD}"),
        ("bf16_4x1", ["native"], "scheme bf16 is not int8"),
        ("fp32", ["native"], "scheme none is not int8"),
    ],
)
def test_candidates(artifacts, case, candidates, reason):
    names, why = candidate_backends(load_artifact(artifacts[case]))
    assert names == candidates and why.startswith(reason), (names, why)


def test_unstructured_int8_has_few_all_zero_blocks(artifacts):
    sparsity = int8_block_sparsity(load_artifact(artifacts["int8_unstructured"]))
    assert 0.3 < sparsity < SPARSE_MIN_BLOCK_SPARSITY  # 0.41: independent zeros rarely fill a block
    assert int8_block_sparsity(load_artifact(artifacts["bf16_4x1"])) is None  # no int8 Linears


def test_a_single_candidate_is_not_raced(artifacts):
    session = create_session(artifacts["bf16_4x1"], batch_size=BATCH, seq_len=SEQ)
    assert session.description.startswith(f"{AUTO} -> native: scheme bf16 is not int8")
    assert "measured" not in session.description
    assert not (artifacts["bf16_4x1"] / CHOICES).exists()


@needs_sparse
def test_auto_races_sparse_and_native_and_deploys_the_faster(sparse_copy, qa_inputs):
    session = create_session(sparse_copy, batch_size=BATCH, seq_len=SEQ)  # backend=AUTO
    speeds = measured_speeds(session.description)
    assert sorted(name for name, *_ in speeds) == sorted(RACED) and session.backend == speeds[0][0]
    medians = [median for _, median, _, _ in speeds]
    assert medians == sorted(medians, reverse=True)  # the fastest median is listed first and wins
    assert all(low <= median <= high for _, median, low, high in speeds)
    first = speeds[0][0]
    assert f"batch {BATCH} x seq {SEQ}, {torch.get_num_threads()} threads" in session.description
    assert session.description.split("; ", 1)[1].startswith(f"{first} ")  # then the backend's own words
    got = session.run(qa_inputs)
    want = create_session(sparse_copy, "eager", batch_size=BATCH, seq_len=SEQ).run(qa_inputs)
    assert logits_cosine(got, want, qa_inputs["attention_mask"]) >= 0.99


@needs_sparse
def test_the_race_is_cached_beside_the_artifact_per_shape(sparse_copy):
    first = create_session(sparse_copy, batch_size=BATCH, seq_len=SEQ)
    stored = json.loads((sparse_copy / CHOICES).read_text())
    (key, choice), *others = stored["choices"].items()
    assert not others and choice["backend"] == first.backend
    assert f"batch {BATCH} | seq {SEQ}" in key and "candidates " + ",".join(sorted(RACED)) in key
    # the cache decides: a recorded win for the other backend is obeyed without racing again
    loser = "native" if first.backend == "sparse" else "sparse"
    choice.update(backend=loser, verdict="measured by hand")
    (sparse_copy / CHOICES).write_text(json.dumps(stored))
    again = create_session(sparse_copy, batch_size=BATCH, seq_len=SEQ)
    assert again.backend == loser and "measured by hand (cached)" in again.description
    # another shape is another race, recorded beside the first
    other = create_session(sparse_copy, batch_size=BATCH + 1, seq_len=SEQ)
    assert "(cached)" not in other.description and measured_speeds(other.description)
    assert len(json.loads((sparse_copy / CHOICES).read_text())["choices"]) == 2


@needs_sparse
def test_a_record_for_other_weights_is_ignored(sparse_copy):
    create_session(sparse_copy, batch_size=BATCH, seq_len=SEQ)
    stored = json.loads((sparse_copy / CHOICES).read_text())
    stored["weights_sha256"] = "0" * 64  # as if the artifact's weights had been replaced
    (sparse_copy / CHOICES).write_text(json.dumps(stored))
    session = create_session(sparse_copy, batch_size=BATCH, seq_len=SEQ)
    assert "(cached)" not in session.description and measured_speeds(session.description)


@needs_sparse
def test_a_candidate_that_cannot_be_built_drops_out(sparse_copy, monkeypatch):
    """The sparse kernel's build failing (no compiler, an ISA it lacks) must leave native, not an error."""
    real = auto.build_runner

    def failing_peers(name, *args):
        if name != "native":
            raise RuntimeError(f"Error building extension '{name}'; g++ not found\nmore lines")
        return real(name, *args)

    monkeypatch.setattr(auto, "build_runner", failing_peers)
    session = create_session(sparse_copy, batch_size=BATCH, seq_len=SEQ)
    failures = "".join(
        f", {name} failed to build (RuntimeError: Error building extension '{name}', g++ not found)"
        for name in RACED
        if name != "native"
    )
    assert session.backend == "native"
    assert session.description.startswith(
        f"{AUTO} -> native: 4x1 block sparsity 0.80 of the int8 Linears{failures}, so native; native"
    )
    assert not (sparse_copy / CHOICES).exists()  # a failed build is not a measured race


@needs_sparse
def test_no_buildable_candidate_is_one_error(sparse_copy, monkeypatch):
    def failing(name, *args):
        raise BackendError(f"{name} cannot run here")

    monkeypatch.setattr(auto, "build_runner", failing)
    with pytest.raises(
        BackendError, match="auto: no candidate backend could be built .*sparse failed to build"
    ):
        create_session(sparse_copy, batch_size=BATCH, seq_len=SEQ)
