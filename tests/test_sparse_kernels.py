"""4x1 block-sparse int8 GEMM kernels: every code path this CPU can run must match a dense int8 reference bit
for bit (int32 accumulators), and the fused `sparse_linear` must match a float reference."""

from __future__ import annotations

import pytest
import torch

from fastcpu_runtime.kernels import PackedWeight, available_paths, pack_4x1, sparse_int8_gemm, sparse_linear

ALL_PATHS = ("avx512_vnni", "avx2", "scalar")


@pytest.fixture(params=ALL_PATHS)
def path(request) -> str:
    if request.param not in available_paths():  # builds the extension on first use
        pytest.skip(f"this CPU cannot run the {request.param} path")
    return request.param


def block_sparse(
    out: int, n_in: int, sparsity: float, gen: torch.Generator, low=-127, high=127
) -> torch.Tensor:
    """Random int8 [out, in]; each 4x1 block (4 output rows x 1 input column) is zeroed w.p. sparsity."""
    w = torch.randint(low, high + 1, (out, n_in), dtype=torch.int8, generator=gen)
    keep = torch.rand(out // 4, 1, n_in, generator=gen) >= sparsity
    return w * keep.expand(out // 4, 4, n_in).reshape(out, n_in)


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.long() @ w.long().T


def check_exact(x: torch.Tensor, w: torch.Tensor, path: str) -> None:
    got = sparse_int8_gemm(x, pack_4x1(w), path)
    assert got.dtype == torch.int32 and got.shape == (x.shape[0], w.shape[0])
    torch.testing.assert_close(got.long(), reference(x, w), rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 3, 17, 33, 130])
@pytest.mark.parametrize("n_in", [5, 64, 383])
@pytest.mark.parametrize("out", [4, 12, 384])
def test_odd_shapes_bit_exact(path, n, n_in, out):
    gen = torch.Generator().manual_seed(n * 10007 + n_in * 101 + out)
    x = torch.randint(0, 256, (n, n_in), dtype=torch.uint8, generator=gen)
    check_exact(x, block_sparse(out, n_in, 0.6, gen), path)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.9, 0.99])
def test_sparsity_levels(path, sparsity):
    gen = torch.Generator().manual_seed(int(sparsity * 100))
    x = torch.randint(0, 256, (70, 768), dtype=torch.uint8, generator=gen)
    check_exact(x, block_sparse(256, 768, sparsity, gen), path)


def test_zero_block_rows_and_zero_weight(path):
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (33, 100), dtype=torch.uint8, generator=gen)
    w = block_sparse(32, 100, 0.3, gen)
    w[4:8] = 0  # whole block-rows without any non-zero block
    w[20:28] = 0
    check_exact(x, w, path)
    check_exact(x, torch.zeros(32, 100, dtype=torch.int8), path)
    assert pack_4x1(torch.zeros(32, 100, dtype=torch.int8)).col_idx.shape == (0, 4)


def test_extreme_values_do_not_saturate(path):
    """x = 255 and |w| = 127 on a long row: int16 pair sums (vpmaddubsw) would saturate, int32 must not."""
    n_in = 4001
    x = torch.full((17, n_in), 255, dtype=torch.uint8)
    w = torch.full((8, n_in), 127, dtype=torch.int8)
    w[4:] = -127
    w[2, ::2] = -127  # mixed signs within one group
    check_exact(x, w, path)
    assert sparse_int8_gemm(x, pack_4x1(w), path)[0, 0] == 255 * 127 * n_in
    check_exact(x, torch.full((4, n_in), -128, dtype=torch.int8), path)  # int8 minimum too


def test_sparse_weights_with_structure(path):
    """Non-zeros clustered at the ends of the row and a single non-zero column (padding-heavy groups)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (65, 300), dtype=torch.uint8, generator=gen)
    w = torch.zeros(16, 300, dtype=torch.int8)
    w[:4, :3] = 5
    w[4:8, 297:] = -7
    w[8:12, 150] = 127
    w[12:16] = block_sparse(4, 300, 0.97, gen)
    check_exact(x, w, path)


@pytest.mark.parametrize("n, n_in, out", [(1, 5, 4), (37, 383, 384), (130, 64, 12)])
def test_sparse_linear_matches_float(path, n, n_in, out):
    gen = torch.Generator().manual_seed(n + n_in + out)
    x = torch.randint(0, 256, (n, n_in), dtype=torch.uint8, generator=gen)
    w = block_sparse(out, n_in, 0.7, gen)
    w_scale = torch.rand(out, generator=gen) / 100
    bias = torch.randn(out, generator=gen)
    x_scale, zp = 0.02, 117
    expected = ((x.double() - zp) * x_scale) @ (w.double() * w_scale.double()[:, None]).T + bias.double()
    got = sparse_linear(x, x_scale, zp, pack_4x1(w), w_scale, bias, path=path)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    no_bias = sparse_linear(x, x_scale, zp, pack_4x1(w), w_scale, None, path=path)
    torch.testing.assert_close(no_bias.double(), expected - bias.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n, n_in, out", [(1, 5, 4), (70, 96, 200), (130, 64, 1036)])
def test_gelu_epilogue_requantizes_as_pytorch_does(path, n, n_in, out):
    """GELU + uint8 requantization in the GEMM's epilogue gives what F.gelu and the backend's own
    quantization give on the float32 output: equal, but for the rare value that an erf approximation
    1e-7 away moves across a rounding boundary (then by one step). Widths that leave a partial chunk
    (200, 1036) exercise the tail stores."""
    from fastcpu_runtime.backends.sparse import qparams_from_range, quantize_uint8

    gen = torch.Generator().manual_seed(n + out)
    x = torch.randint(0, 256, (n, n_in), dtype=torch.uint8, generator=gen)
    w, w_scale = block_sparse(out, n_in, 0.7, gen), torch.rand(out, generator=gen) / 100
    bias = torch.randn(out, generator=gen)
    packed, x_scale, zp = pack_4x1(w), 0.02, 117
    activations = torch.nn.functional.gelu(sparse_linear(x, x_scale, zp, packed, w_scale, bias, path=path))
    scale, zero_point = qparams_from_range(*torch.aminmax(activations))
    expected = quantize_uint8(activations, scale, zero_point)
    got = sparse_linear(x, x_scale, zp, packed, w_scale, bias, path=path, gelu_out=(scale, zero_point))
    assert got.dtype == torch.uint8 and got.shape == (n, out)
    assert (got.int() - expected.int()).abs().max() <= 1
    assert (got == expected).float().mean() >= 0.995
    assert len(expected.unique()) > min(30, expected.numel() // 2)  # the range is used, not clamped


def test_packed_format_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(3)
    w = block_sparse(48, 77, 0.8, gen)
    packed = pack_4x1(w)
    save_file(packed.to_dict("layer."), str(tmp_path / "p.safetensors"))
    loaded = PackedWeight.from_dict(load_file(str(tmp_path / "p.safetensors")), "layer.")
    assert (loaded.out_features, loaded.in_features) == (48, 77)
    torch.testing.assert_close(loaded.row_sums, w.int().sum(1, dtype=torch.int32))
    x = torch.randint(0, 256, (5, 77), dtype=torch.uint8, generator=gen)
    torch.testing.assert_close(sparse_int8_gemm(x, loaded).long(), reference(x, w), rtol=0, atol=0)


def test_available_paths_and_default():
    paths = available_paths()
    assert paths[-1] == "scalar" and set(paths) <= set(ALL_PATHS)
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (9, 40), dtype=torch.uint8, generator=gen)
    w = block_sparse(8, 40, 0.5, gen)
    torch.testing.assert_close(sparse_int8_gemm(x, pack_4x1(w)).long(), reference(x, w), rtol=0, atol=0)


def test_errors():
    gen = torch.Generator().manual_seed(5)
    w = block_sparse(8, 16, 0.5, gen)
    x = torch.randint(0, 256, (3, 16), dtype=torch.uint8, generator=gen)
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_4x1(torch.zeros(6, 16, dtype=torch.int8))
    with pytest.raises(TypeError, match="int8"):
        pack_4x1(w.float())
    with pytest.raises(TypeError, match="uint8"):
        sparse_int8_gemm(x.to(torch.int8), pack_4x1(w))
    with pytest.raises(TypeError, match="uint8"):
        sparse_int8_gemm(x.float(), pack_4x1(w))
    with pytest.raises(ValueError, match=r"\[n, 16\]"):
        sparse_int8_gemm(x[:, :15], pack_4x1(w))
    with pytest.raises(RuntimeError, match="unknown path"):
        sparse_int8_gemm(x, pack_4x1(w), path="avx9000")
