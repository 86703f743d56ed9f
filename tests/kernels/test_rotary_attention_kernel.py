"""kernels.rotary_attention (Triton flash attention, interpreter, fp32) against float64 attention."""

from __future__ import annotations

import pytest
import torch

import kernels.rotary_attention as triton_attention
from kernels import dispatch, reference
from kernels.rotary_attention import dropout_keep_mask, rotary_attention

pytestmark = pytest.mark.usefixtures("seeded")


def eager_rotary_attention64(q, k, v, mask, interleaved, scale=None, dropout_keep=None, dropout_p=0.0):
    """Explicit float64 RoPE (complex rotation) + masked softmax attention, independent of the
    reference's SDPA path. Fully padded sequences give zeros. ``dropout_keep`` [batch, heads, q, k] (bool):
    dropout on the probabilities, kept ones scaled by 1 / (1 - dropout_p)."""
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
    probs = scores.softmax(-1)
    if dropout_keep is not None:
        probs = probs * dropout_keep.double() / (1.0 - dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
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


# --- dropout on the attention probabilities -----------------------------------------------------


@pytest.fixture
def drawn_seeds(monkeypatch):
    """Record every Philox seed the Triton path draws (one per forward call, none in backward)."""
    seeds = []
    draw = triton_attention.draw_dropout_seed

    def recording(device):
        seed = draw(device)
        seeds.append(int(seed))
        return seed

    monkeypatch.setattr(triton_attention, "draw_dropout_seed", recording)
    return seeds


DROPOUT_CASES = [
    # batch, seq, heads, head_dim, interleaved, dropout_p; every case: random key padding + one empty row
    pytest.param(3, 7, 2, 32, True, 0.1, id="s7-d32-interleaved-p0.1"),
    pytest.param(3, 7, 2, 64, False, 0.5, id="s7-d64-halves-p0.5"),
    pytest.param(3, 33, 2, 64, False, 0.1, id="s33-d64-halves-p0.1"),
    pytest.param(3, 33, 2, 32, True, 0.5, id="s33-d32-interleaved-p0.5"),
]


@pytest.mark.parametrize("batch,seq,heads,dim,interleaved,p", DROPOUT_CASES)
def test_dropout_forward_and_gradients_match_float64_with_the_kernels_mask(
        batch, seq, heads, dim, interleaved, p, drawn_seeds):
    q, k, v = (torch.randn(batch, seq, heads, dim, requires_grad=True) for _ in range(3))
    mask = _padding_mask(batch, seq, "empty_row")
    mask[1, -2:] = 0  # at least one padded key in a non-empty row
    cos, sin = reference.rotary_tables(seq, dim)
    out = rotary_attention(q, k, v, cos, sin, mask, interleaved, dropout_p=p)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert len(drawn_seeds) == 1  # one seed per call, reused (not redrawn) by the backward
    keep = dropout_keep_mask(drawn_seeds[0], batch, heads, seq, p)
    assert keep.shape == (batch, heads, seq, seq) and not bool(keep.all())

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = eager_rotary_attention64(q64, k64, v64, mask, interleaved, dropout_keep=keep, dropout_p=p)
    expected.backward(grad_out.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)  # seen: <= 7e-7
    for name, got, want in (("q", q.grad, q64.grad), ("k", k.grad, k64.grad), ("v", v.grad, v64.grad)):
        # seen: <= 3e-6 (fp32 accumulation; p = 0.5 doubles the kept terms)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0, msg=lambda m, n=name: f"d{n}: {m}")
    # the empty sequence stays exactly zero, with zero gradients
    assert float(out.detach()[-1].abs().max()) == 0.0 and float(q.grad[-1].abs().max()) == 0.0
    # the comparison can fail: the same computation with another mask (or none) is far off
    other = dropout_keep_mask(drawn_seeds[0] + 1, batch, heads, seq, p)
    wrong = eager_rotary_attention64(q64, k64, v64, mask, interleaved, dropout_keep=other, dropout_p=p)
    assert float((out.detach().double() - wrong.detach()).abs().max()) > 1e-2
    undropped = eager_rotary_attention64(q64, k64, v64, mask, interleaved)
    assert float((out.detach().double() - undropped.detach()).abs().max()) > 1e-2


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_fraction_is_one_minus_p(p):
    batch, heads, seq = 2, 2, 128
    keep = dropout_keep_mask(12345, batch, heads, seq, p)
    n = keep.numel()  # 65536 draws: sigma = 0.0012 (p = 0.1), 0.002 (p = 0.5)
    sigma = (p * (1 - p) / n) ** 0.5
    fraction = keep.double().mean().item()
    assert abs(fraction - (1 - p)) < 4 * sigma, (fraction, 1 - p, sigma)
    # every (batch*head) slice and every row gets its own draws: no repeated pattern
    flat = keep.reshape(batch * heads, seq, seq)
    assert not torch.equal(flat[0], flat[1]) and not torch.equal(flat[0, 0], flat[0, 1])
    assert not torch.equal(flat[0, :, :-1], flat[0, :, 1:])  # not a shift of one sequence
    # deterministic in the seed; another seed gives another mask; p = 0 keeps everything
    assert torch.equal(dropout_keep_mask(12345, batch, heads, seq, p), keep)
    assert not torch.equal(dropout_keep_mask(12346, batch, heads, seq, p), keep)
    assert bool(dropout_keep_mask(7, 1, 1, 9, 0.0).all())


def test_dropout_seeded_replay_reseed_and_p0_bit_identity():
    batch, seq, heads, dim = 2, 17, 2, 32
    q, k, v = (torch.randn(batch, seq, heads, dim, requires_grad=True) for _ in range(3))
    mask = _padding_mask(batch, seq, "padding")
    cos, sin = reference.rotary_tables(seq, dim)
    grad_out = torch.randn(batch, seq, heads, dim)

    def run(p, seed=None):
        for t in (q, k, v):
            t.grad = None
        if seed is not None:
            torch.manual_seed(seed)
        out = rotary_attention(q, k, v, cos, sin, mask, True, dropout_p=p)
        out.backward(grad_out)
        return [out.detach()] + [t.grad.clone() for t in (q, k, v)]

    first, again, other = run(0.2, seed=3), run(0.2, seed=3), run(0.2, seed=4)
    for a, b in zip(first, again):
        assert torch.equal(a, b)  # same torch seed -> same mask -> bit-identical output and gradients
    for a, b in zip(first, other):
        assert not torch.equal(a, b)  # reseeding torch changes the mask
    plain = run(0.0, seed=None)
    state = torch.get_rng_state()
    zero = run(0.0)
    assert torch.equal(torch.get_rng_state(), state)  # p = 0 draws no seed: the RNG stream is untouched
    plain_default = [rotary_attention(q.detach(), k.detach(), v.detach(), cos, sin, mask, True)]
    for a, b in zip(plain, zero):
        assert torch.equal(a, b)
    assert torch.equal(plain_default[0], zero[0])


def test_dropout_p_outside_unit_interval_is_refused():
    cos, sin = reference.rotary_tables(7, 32)
    q = torch.randn(1, 7, 2, 32)
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
            rotary_attention(q, q, q, cos, sin, dropout_p=bad)
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
            reference.rotary_attention(q, q, q, cos, sin, dropout_p=bad)


def test_dispatch_passes_dropout_to_either_backend(drawn_seeds):
    q, k, v = (torch.randn(2, 9, 2, 32) for _ in range(3))
    mask = _padding_mask(2, 9, "padding")
    cos, sin = reference.rotary_tables(9, 32)
    for backend in ("triton", "reference"):
        plain = dispatch.rotary_attention(q, k, v, cos, sin, mask, backend=backend)
        torch.manual_seed(0)
        dropped = dispatch.rotary_attention(q, k, v, cos, sin, mask, dropout_p=0.5, backend=backend)
        assert not torch.allclose(dropped, plain)
        torch.manual_seed(0)
        again = dispatch.rotary_attention(q, k, v, cos, sin, mask, True, None, 0.5, backend=backend)
        assert torch.equal(again, dropped)
    assert len(drawn_seeds) == 2  # the two Triton calls with dropout, none for the reference


def test_reference_dropout_is_unbiased_with_the_dropout_variance(seeded):
    """Dropout in the reference: E[out] = the p = 0 output, Var[out] = p / (1 - p) sum_j P_j^2 v_j^2.

    Mean: over N seeds the mean deviates from the p = 0 output by z * std / sqrt(N) per element,
    z ~ N(0, 1); the test bounds max |z| < 6 (640 elements: a false failure has probability ~ 1e-6).
    Variance: the sample variance over the N draws against the formula, averaged over the elements,
    must be within 5 % of 1. Its spread over 60 seeds was 0.005 (the 16 outputs of one query share a
    mask row, so a chi-square of the z's would have far fewer degrees of freedom than elements).
    A missing 1 / (1 - p) scale shifts the mean by p * |out| (z in the tens) and halves the variance;
    no dropout gives variance 0.
    """
    batch, seq, heads, dim, p, n = 3, 10, 2, 16, 0.3, 400
    q, k, v = (torch.randn(batch, seq, heads, dim, dtype=torch.float64) for _ in range(3))
    mask = _padding_mask(batch, seq, "empty_row")
    cos, sin = reference.rotary_tables(seq, dim, dtype=torch.float64)
    base = reference.rotary_attention(q, k, v, cos, sin, mask, True)
    torch.testing.assert_close(base, eager_rotary_attention64(q, k, v, mask, True), atol=1e-12, rtol=0)
    samples = torch.stack([reference.rotary_attention(q, k, v, cos, sin, mask, True, dropout_p=p)
                           for _ in range(n)])
    assert not torch.allclose(samples[0], base) and not torch.equal(samples[0], samples[1])
    # the probabilities, from the independent float64 computation (one-hot v picks column j)
    qr = reference.apply_rotary(q, cos, sin).transpose(1, 2)
    kr = reference.apply_rotary(k, cos, sin).transpose(1, 2)
    scores = (qr @ kr.transpose(-1, -2)) * dim ** -0.5
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    real = mask.bool().any(dim=1)
    probs = torch.where(real[:, None, None, None], scores.softmax(-1).nan_to_num(0.0), 0.0)
    var = (p / (1 - p)) * torch.einsum("bhqk,bkhd->bqhd", probs ** 2, v ** 2)
    std = (var / n).sqrt()
    assert float(samples[:, ~real].abs().max()) == 0.0  # the empty sequence stays zero under dropout
    z = (samples.mean(0) - base)[real] / std[real]
    assert z.numel() == 640
    assert float(z.abs().max()) < 6.0, float(z.abs().max())
    variance_ratio = float((samples.var(0)[real] / var[real]).mean())
    assert 0.95 < variance_ratio < 1.05, variance_ratio


def test_reference_dropout_gives_gradients():
    q, k, v = (torch.randn(2, 12, 2, 32, requires_grad=True) for _ in range(3))
    mask = _padding_mask(2, 12, "padding")
    cos, sin = reference.rotary_tables(12, 32)
    grad_out = torch.randn(2, 12, 2, 32)
    reference.rotary_attention(q, k, v, cos, sin, mask, True).backward(grad_out)
    plain = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch.manual_seed(1)
    reference.rotary_attention(q, k, v, cos, sin, mask, True, dropout_p=0.2).backward(grad_out)
    for got, want in zip((q.grad, k.grad, v.grad), plain):
        assert got is not None and torch.isfinite(got).all() and float(got.abs().max()) > 0
        assert not torch.allclose(got, want)


@pytest.mark.parametrize("mask_kind", [None, "padding", "empty_row"])
def test_cpu_dropout_attention_is_float64_attention_with_its_mask(mask_kind):
    """On CPU with dropout the reference runs its own attention (not SDPA). Its output and gradients
    equal the independent float64 attention given the mask it drew: re-seeding and calling
    ``dropout_drop_mask`` recovers that mask, as the forward draws nothing else."""
    batch, seq, heads, dim, p = 3, 19, 2, 16, 0.3
    q, k, v = (torch.randn(batch, seq, heads, dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = _padding_mask(batch, seq, mask_kind)
    cos, sin = reference.rotary_tables(seq, dim, dtype=torch.float64)
    grad_out = torch.randn(batch, seq, heads, dim, dtype=torch.float64)
    torch.manual_seed(11)
    out = reference.rotary_attention(q, k, v, cos, sin, mask, True, dropout_p=p)
    out.backward(grad_out)
    got = [t.grad.clone() for t in (q, k, v)]
    torch.manual_seed(11)
    keep = ~reference.dropout_drop_mask((batch, heads, seq, seq), p, "cpu")
    assert 0.2 < 1 - float(keep.double().mean()) < 0.4
    for t in (q, k, v):
        t.grad = None
    expected = eager_rotary_attention64(q, k, v, mask, True, dropout_keep=keep, dropout_p=p)
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    for g, t in zip(got, (q, k, v)):
        torch.testing.assert_close(g, t.grad, atol=1e-12, rtol=1e-10)
    # and the check can fail: another mask gives another output
    wrong = eager_rotary_attention64(q, k, v, mask, True, dropout_keep=keep.flip(-1), dropout_p=p)
    assert not torch.allclose(out, wrong)


def test_cpu_dropout_attention_passes_gradcheck():
    """The hand-written backward against finite differences (float64, same mask on every call)."""
    batch, seq, heads, dim, p = 2, 6, 2, 8, 0.25
    q, k, v = (torch.randn(batch, seq, heads, dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[1] * seq, [1] * 4 + [0] * 2])
    cos, sin = reference.rotary_tables(seq, dim, dtype=torch.float64)

    def attention(q, k, v):
        torch.manual_seed(3)
        return reference.rotary_attention(q, k, v, cos, sin, mask, True, dropout_p=p)

    assert torch.autograd.gradcheck(attention, (q, k, v))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_dropout_drop_mask_rate(p):
    """Drop rate within 5 standard deviations of p over 1M draws, and no visible row structure."""
    drop = reference.dropout_drop_mask((4, 500, 500), p, "cpu")
    assert drop.dtype == torch.bool and drop.shape == (4, 500, 500)
    n = drop.numel()
    tolerance = 5 * (p * (1 - p) / n) ** 0.5
    assert abs(float(drop.double().mean()) - p) <= tolerance
    if p > 0:
        rows = drop.double().mean(-1)  # 2,000 rows of 500: each within 6 sd of p
        assert float((rows - p).abs().max()) < 6 * (p * (1 - p) / 500) ** 0.5


def test_the_kernel_refuses_fp32_on_a_gpu(monkeypatch):
    """Compiled (GPU) fp32 attention is kernels.dispatch's to send to SDPA (Triton's exact fp32 dots have no
    tensor cores); the kernel itself refuses it rather than choosing a backend. (Stood in on CPU: the module is
    told its kernels are compiled; fp16 then gets past the refusal to the launch, which is a spy.)"""
    launched = []
    monkeypatch.setattr(triton_attention, "kernels_interpreted", lambda: False)
    monkeypatch.setattr(triton_attention, "check_kernel_inputs", lambda *a, **k: None)
    monkeypatch.setattr(triton_attention._RotaryAttention, "apply", lambda *a: launched.append(a) or "kernel")
    q = torch.randn(1, 5, 2, 32)
    cos, sin = reference.rotary_tables(5, 32)
    with pytest.raises(TypeError, match="float32 on a GPU goes to PyTorch's SDPA.*kernels.dispatch.rotary_attention"):
        rotary_attention(q, q, q, cos, sin, None, True, None, 0.1)
    assert not launched
    half = q.half()
    assert rotary_attention(half, half, half, cos, sin, None, True, None, 0.1) == "kernel" and len(launched) == 1
