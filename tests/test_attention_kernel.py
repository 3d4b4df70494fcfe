"""The fused attention kernel (`fastcpu::attention`) against PyTorch's attention, and the key-padding mask the
int8/bf16 backends' attention functions take: same outputs, padded keys get no weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert_config
from transformers import AutoModel

from fastcpu_runtime.cpu import cpu_flags
from fastcpu_runtime.kernels.attention import fused_attention
from fastcpu_runtime.kernels.sparse import load_extension
from fastcpu_runtime.modeling import BF16_ATTENTION, BF16_SDPA, _register_fast_attention

# The scalar loops run everywhere; the AVX-512 BF16 path only where the CPU has it (its dot products are
# bf16, so it is held to a cosine, the scalar fp32 loops to float rounding).
NO_BF16 = pytest.mark.skipif("avx512_bf16" not in cpu_flags(), reason="no AVX-512 BF16")
PATHS = [False, pytest.param(True, marks=NO_BF16)]


def qkv_views(batch: int, heads: int, seq: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, H, S, D]: views of one [B, S, 3, H, D] tensor, as the merged QKV GEMM leaves them."""
    rows = torch.randn(batch, seq, 3, heads, dim, generator=torch.Generator().manual_seed(seed))
    return tuple(rows[:, :, i].transpose(1, 2) for i in range(3))


def reference(q, k, v, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """fp32 attention, [B, S, H, D]; a query with no key to attend gets zeros."""
    attend = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=scale).nan_to_num(0.0)
    return out.transpose(1, 2).contiguous()


def padding_mask(batch: int, seq: int) -> torch.Tensor:
    """Row 0 attends to everything, row 1 to its first half, row 2 (if any) to nothing."""
    mask = torch.ones(batch, seq, dtype=torch.bool)
    if batch > 1:
        mask[1, seq // 2 :] = False
    if batch > 2:
        mask[2] = False
    return mask


@pytest.mark.parametrize("vectorized", PATHS)
@pytest.mark.parametrize("shape", [(3, 4, 37, 64), (2, 12, 128, 32), (3, 2, 20, 16), (2, 2, 9, 24)])
def test_fused_attention_matches_pytorch(vectorized, shape):
    batch, heads, seq, dim = shape
    q, k, v = qkv_views(*shape)
    mask = padding_mask(batch, seq)
    got = load_extension().fused_attention(q, k, v, mask, dim**-0.5, vectorized)
    expected = reference(q, k, v, mask, dim**-0.5)
    assert got.shape == (batch, seq, heads, dim) and got.is_contiguous()
    if batch > 2:
        assert torch.count_nonzero(got[2]) == 0, "a row with no key to attend must give zeros, not NaN"
    if vectorized and dim % 16 == 0:
        assert F.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.999
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vectorized", PATHS)
def test_padded_keys_and_values_change_nothing(vectorized):
    q, k, v = qkv_views(2, 4, 40, 32)
    mask = padding_mask(2, 40)
    before = load_extension().fused_attention(q, k, v, mask, 0.2, vectorized)
    k, v = k.clone(), v.clone()
    k[1, :, 20:] += 50.0
    v[1, :, 20:] -= 80.0
    after = load_extension().fused_attention(q, k, v, mask, 0.2, vectorized)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_the_custom_op_without_a_mask_attends_everywhere():
    q, k, v = qkv_views(2, 4, 24, 16)
    expected = reference(q, k, v, None, 0.25)
    torch.testing.assert_close(fused_attention(q, k, v, None, 0.25), expected, rtol=1e-2, atol=1e-2)


def test_bad_inputs_are_refused():
    q, k, v = qkv_views(2, 4, 24, 16)
    with pytest.raises(RuntimeError, match="shapes differ"):
        load_extension().fused_attention(q, k[:, :2], v, torch.ones(2, 24, dtype=torch.bool), 0.25, False)
    with pytest.raises(RuntimeError, match=r"key_mask must be bool \[B, S\]"):
        load_extension().fused_attention(q, k, v, torch.ones(2, 23, dtype=torch.bool), 0.25, False)


@pytest.mark.parametrize("implementation", [BF16_ATTENTION, BF16_SDPA])
def test_fast_attentions_take_the_padding_mask_as_a_key_row(implementation):
    """A whole model on the backends' bf16 attentions (their mask a [B, 1, 1, S] key row) gives fp32 sdpa's
    hidden states on the real tokens, and what stands in the padding changes none of them."""
    _register_fast_attention()
    torch.manual_seed(0)
    reference_model = AutoModel.from_config(tiny_bert_config()).eval()
    model = AutoModel.from_config(tiny_bert_config(attn_implementation=implementation)).eval()
    model.load_state_dict(reference_model.state_dict())
    ids = torch.randint(1000, 2000, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    with torch.no_grad():
        expected = reference_model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ids[1, 15:] = 7
        again = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert F.cosine_similarity(got[real].flatten(), expected[real].flatten(), dim=0) > 0.999
    torch.testing.assert_close(again[real], got[real], rtol=0, atol=0)
