"""kernels.rotary_attention (Triton flash attention, interpreter, fp32) against float64 attention."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.rotary_attention import rotary_attention

pytestmark = pytest.mark.usefixtures("seeded")


def eager_rotary_attention64(q, k, v, mask, interleaved, scale=None):
    """Explicit float64 RoPE (complex rotation) + masked softmax attention, independent of the
    reference's SDPA path. Fully padded sequences give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    _, seq, _, dim = q.shape
    half = dim // 2
    theta = 10000.0 ** (-2.0 * torch.arange(half, dtype=torch.float64) / dim)
    phase = torch.polar(torch.ones(seq, half, dtype=torch.float64),
                        torch.arange(seq, dtype=torch.float64)[:, None] * theta)[None, :, None, :]

    def rotate(x):
        if interleaved:
            z = torch.complex(x[..., 0::2], x[..., 1::2]) * phase
            return torch.stack((z.real, z.imag), -1).flatten(-2)
        z = torch.complex(x[..., :half], x[..., half:]) * phase
        return torch.cat((z.real, z.imag), -1)

    scale = dim ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", rotate(q), rotate(k)) * scale
    if mask is not None:
        keep = mask.bool()[:, None, None, :]
        scores = scores.masked_fill(~keep, float("-inf"))
        empty = ~mask.bool().any(dim=1)
        scores = scores.masked_fill(empty[:, None, None, None], 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    if mask is not None:
        out = out * (~empty).double()[:, None, None, None]
    return out


def _padding_mask(batch: int, seq: int, kind: str | None) -> torch.Tensor | None:
    if kind is None:
        return None
    lengths = torch.randint(1, seq + 1, (batch,))
    lengths[0] = seq  # one full row
    if kind == "empty_row":
        lengths[-1] = 0  # a sequence with no real token at all
    return (torch.arange(seq)[None, :] < lengths[:, None]).long()


CASES = [
    # batch, seq, heads, head_dim, interleaved, mask
    pytest.param(2, 7, 2, 32, True, None, id="s7-d32-interleaved"),
    pytest.param(2, 33, 3, 64, False, "padding", id="s33-d64-halves-padding"),
    pytest.param(3, 33, 2, 32, True, "empty_row", id="s33-d32-empty-row"),
    pytest.param(1, 20, 1, 128, True, "padding", id="s20-d128"),
    pytest.param(2, 17, 2, 48, False, "padding", id="s17-d48-not-pow2"),
    pytest.param(1, 751, 1, 32, True, "padding", id="s751-d32"),
]


@pytest.mark.parametrize("batch,seq,heads,dim,interleaved,mask_kind", CASES)
def test_forward_and_all_gradients_match_float64(batch, seq, heads, dim, interleaved, mask_kind):
    q, k, v = (torch.randn(batch, seq, heads, dim, requires_grad=True) for _ in range(3))
    mask = _padding_mask(batch, seq, mask_kind)
    cos, sin = reference.rotary_tables(seq, dim)
    out = rotary_attention(q, k, v, cos, sin, mask, interleaved)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = eager_rotary_attention64(q64, k64, v64, mask, interleaved)
    expected.backward(grad_out.double())
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)
    for name, got, want in (("q", q.grad, q64.grad), ("k", k.grad, k64.grad), ("v", v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=0, msg=lambda m, n=name: f"d{n}: {m}")
    # The reference twin agrees too (it is what the CPU path runs).
    torch.testing.assert_close(out, reference.rotary_attention(q.detach(), k.detach(), v.detach(), cos, sin,
                                                               mask, interleaved), atol=2e-5, rtol=0)


def test_fully_padded_sequence_gives_zero_output_and_zero_gradients():
    q, k, v = (torch.randn(2, 9, 2, 32, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1] = 0
    cos, sin = reference.rotary_tables(9, 32)
    out = rotary_attention(q, k, v, cos, sin, mask)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert float(out.detach()[1].abs().max()) == 0.0
    for t in (q, k, v):
        assert float(t.grad[1].abs().max()) == 0.0 and float(t.grad[0].abs().max()) > 0.0


def test_strided_inputs_and_custom_scale():
    batch, seq, heads, dim = 2, 13, 2, 32
    qkv = torch.randn(batch, seq, 3, heads, dim, requires_grad=True)  # fused projection output
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    v_bhsd = torch.randn(batch, heads, seq, dim, requires_grad=True)
    v = v_bhsd.transpose(1, 2)  # BHSD memory seen as BSHD
    mask = _padding_mask(batch, seq, "padding")
    cos, sin = reference.rotary_tables(seq, dim)
    out = rotary_attention(q, k, v, cos, sin, mask, True, softmax_scale=0.3)
    grad_out = torch.randn(batch, heads, seq, dim).transpose(1, 2)  # non-contiguous upstream gradient
    out.backward(grad_out)

    qkv64 = qkv.detach().double().requires_grad_()
    v64 = v_bhsd.detach().double().requires_grad_()
    expected = eager_rotary_attention64(qkv64[:, :, 0], qkv64[:, :, 1], v64.transpose(1, 2), mask, True, scale=0.3)
    expected.backward(grad_out.double())
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(qkv.grad.double(), qkv64.grad, atol=5e-5, rtol=0)
    assert float(qkv.grad[:, :, 2].abs().max()) == 0.0  # the unused v slot of the fused tensor
    torch.testing.assert_close(v_bhsd.grad.double(), v64.grad, atol=5e-5, rtol=0)


def test_bool_mask_and_fp16_inputs():
    q, k, v = (torch.randn(1, 11, 2, 32).half() for _ in range(3))
    mask = torch.ones(1, 11, dtype=torch.bool)
    mask[0, 8:] = False
    cos, sin = reference.rotary_tables(11, 32)
    out = rotary_attention(q, k, v, cos, sin, mask)
    assert out.dtype == torch.float16
    expected = eager_rotary_attention64(q, k, v, mask.long(), True)
    torch.testing.assert_close(out.double(), expected, atol=3e-3, rtol=0)


def test_clear_errors():
    cos, sin = reference.rotary_tables(7, 32)
    q = torch.randn(1, 7, 2, 32)
    with pytest.raises(ValueError, match="same shape"):
        rotary_attention(q, q, torch.randn(1, 7, 2, 16), cos, sin)
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, seq\]"):
        rotary_attention(q, q, q, cos, sin, torch.ones(1, 8))
    with pytest.raises(ValueError, match="cos/sin"):
        rotary_attention(q, q, q, *reference.rotary_tables(8, 32))
    with pytest.raises(TypeError, match="share a dtype"):
        rotary_attention(q, q, q.half(), cos, sin)
    with pytest.raises(ValueError, match="detach the tables"):
        rotary_attention(q, q, q, cos.clone().requires_grad_(), sin)
