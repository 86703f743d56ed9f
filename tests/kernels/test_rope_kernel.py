"""kernels.rope (Triton, interpreter, fp32) against the reference and an independent float64 RoPE."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.rope import apply_rotary, apply_rotary_

pytestmark = pytest.mark.usefixtures("seeded")


def rope_complex64(x: torch.Tensor, seq_len: int, interleaved: bool, base: float = 10000.0) -> torch.Tensor:
    """RoPE as a complex multiplication in float64, written independently of kernels.reference."""
    x = x.double()
    half = x.shape[-1] // 2
    theta = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    phase = torch.polar(torch.ones(seq_len, half, dtype=torch.float64),
                        torch.arange(seq_len, dtype=torch.float64)[:, None] * theta)[None, :, None, :]
    if interleaved:
        z = torch.complex(x[..., 0::2], x[..., 1::2]) * phase
        return torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    z = torch.complex(x[..., :half], x[..., half:]) * phase
    return torch.cat((z.real, z.imag), dim=-1)


def _layout(shape: tuple[int, int, int, int], layout: str) -> torch.Tensor:
    batch, seq, heads, dim = shape
    if layout == "bshd":
        return torch.randn(batch, seq, heads, dim)
    if layout == "bhsd_view":  # BHSD-contiguous memory seen as BSHD: no copy allowed
        return torch.randn(batch, heads, seq, dim).transpose(1, 2)
    if layout == "fused_qkv_slice":  # the k slice of a fused [B, S, 3, H, D] projection
        return torch.randn(batch, seq, 3, heads, dim)[:, :, 1]
    raise AssertionError(layout)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd_view", "fused_qkv_slice"])
@pytest.mark.parametrize("shape", [(2, 7, 3, 32), (1, 33, 5, 64)], ids=["s7", "s33"])
def test_forward_and_backward_match_float64(shape, layout, interleaved):
    x = _layout(shape, layout).requires_grad_()
    seq, dim = shape[1], shape[3]
    cos, sin = reference.rotary_tables(seq, dim)
    out = apply_rotary(x, cos, sin, interleaved)

    assert out.dtype == x.dtype and out.shape == x.shape
    if layout == "bhsd_view":  # layout kept, the view was read through its strides
        assert out.stride() == x.stride()
    expected = rope_complex64(x.detach(), seq, interleaved)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=0)
    torch.testing.assert_close(out, reference.apply_rotary(x.detach(), cos, sin, interleaved), atol=1e-6, rtol=0)

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    x64 = x.detach().double().requires_grad_()
    rope_complex64(x64, seq, interleaved).backward(grad_out.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=2e-6, rtol=0)


def test_long_sequence_751_and_many_heads():
    x = torch.randn(1, 751, 12, 32)
    cos, sin = reference.rotary_tables(751, 32)
    out = apply_rotary(x, cos, sin, True)
    torch.testing.assert_close(out.double(), rope_complex64(x, 751, True), atol=1e-5, rtol=0)


def test_odd_head_dim_not_power_of_two():
    x = torch.randn(2, 9, 3, 40, requires_grad=True)  # d/2 = 20: masked lanes
    cos, sin = reference.rotary_tables(9, 40)
    out = apply_rotary(x, cos, sin, False)
    torch.testing.assert_close(out.double(), rope_complex64(x.detach(), 9, False), atol=2e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_in_and_out_with_fp32_maths(dtype):
    x = torch.randn(2, 7, 2, 32).to(dtype)
    cos, sin = reference.rotary_tables(7, 32)
    out = apply_rotary(x, cos, sin, True)
    assert out.dtype == dtype
    # fp32 maths then one rounding to the output dtype: within one ulp of the float64 result.
    expected = rope_complex64(x.float(), 7, True)
    ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    err = (out.double() - expected).abs() / expected.abs().clamp(min=1e-3)
    assert float(err.max()) <= ulp


def test_in_place_rotates_the_same_memory_and_backpropagates():
    base = torch.randn(2, 7, 3, 32, requires_grad=True)
    x = base * 1.0  # a non-leaf, as a projection output would be
    pointer = x.data_ptr()
    cos, sin = reference.rotary_tables(7, 32)
    out = apply_rotary_(x, cos, sin, True)
    assert out.data_ptr() == pointer and out is x
    torch.testing.assert_close(out.double(), rope_complex64(base.detach(), 7, True), atol=2e-6, rtol=0)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    b64 = base.detach().double().requires_grad_()
    rope_complex64(b64, 7, True).backward(grad_out.double())
    torch.testing.assert_close(base.grad.double(), b64.grad, atol=2e-6, rtol=0)


def test_table_gradients_match_reference():
    x = torch.randn(2, 5, 3, 32)
    cos, sin = (t.requires_grad_() for t in reference.rotary_tables(5, 32))
    grad_out = torch.randn(2, 5, 3, 32)
    apply_rotary(x, cos, sin, False).backward(grad_out)
    cos64, sin64 = (t.detach().double().requires_grad_() for t in (cos, sin))
    reference.apply_rotary(x.double(), cos64, sin64, False).backward(grad_out.double())
    torch.testing.assert_close(cos.grad.double(), cos64.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin.grad.double(), sin64.grad, atol=1e-5, rtol=0)


def test_clear_errors():
    cos, sin = reference.rotary_tables(7, 32)
    with pytest.raises(ValueError, match=r"cos/sin must have shape \[seq, head_dim // 2\]"):
        apply_rotary(torch.randn(1, 8, 2, 32), cos, sin)
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rotary(torch.randn(1, 7, 2, 31), cos, sin)
    with pytest.raises(ValueError, match=r"\[batch, seq, heads, head_dim\]"):
        apply_rotary(torch.randn(7, 2, 32), cos, sin)
    with pytest.raises(TypeError, match="float64"):
        apply_rotary(torch.randn(1, 7, 2, 32, dtype=torch.float64), cos, sin)
    with pytest.raises(ValueError, match="in place"):
        apply_rotary_(torch.randn(1, 7, 2, 32), cos.clone().requires_grad_(), sin)
