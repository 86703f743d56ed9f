"""The MPC loss's deterministic group sums, its TF32 rounding and its one argument check."""

from __future__ import annotations

import math
import struct

import pytest
import torch

import kernels.mpc_loss as mpc_module
from kernels import reference

pytestmark = pytest.mark.usefixtures("seeded")


def _order_and_offsets(groups: torch.Tensor):
    _, index, sizes = torch.unique(groups, return_inverse=True, return_counts=True)
    order = torch.argsort(index, stable=True)
    return index, order, torch.cat((sizes.new_zeros(1), sizes.cumsum(0)))


@pytest.mark.parametrize("chunk", [5, 8192], ids=["groups-across-chunks", "one-chunk"])
def test_group_sums_match_float64_and_do_not_use_index_add(monkeypatch, chunk):
    monkeypatch.setattr(mpc_module, "_ROW_CHUNK", chunk)
    groups = torch.tensor([4, 1, 4, 9, 1, 4, 9, 9, 9, 2, 4, 1, 7])  # unequal sizes, unsorted, any ids
    z = torch.randn(13, 6)
    weight = torch.randn(13)
    index, order, offsets = _order_and_offsets(groups)

    def refuse(*args, **kwargs):
        raise AssertionError("index_add_ is an atomic on CUDA: the group sums must not use it")

    monkeypatch.setattr(torch.Tensor, "index_add_", refuse)
    sums = mpc_module._group_sums(z, order, offsets)
    weighted = mpc_module._group_sums(z, order, offsets, weight)
    for g in range(int(index.max()) + 1):
        rows = (index == g).nonzero().flatten()
        torch.testing.assert_close(sums[g].double(), z[rows].double().sum(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(weighted[g].double(), (z[rows].double() * weight[rows, None].double()).sum(0),
                                   atol=1e-6, rtol=0)
    # the whole loss (forward and backward) runs without index_add_ and is the same bits on a rerun
    e = torch.randn(13, 6, requires_grad=True)
    first = mpc_module.mpc_loss(e, groups, 0.1)
    (grad,) = torch.autograd.grad(first, e)
    again = mpc_module.mpc_loss(e, groups, 0.1)
    assert torch.equal(first, again) and torch.equal(grad, torch.autograd.grad(again, e)[0])


def _nearest_tf32(x: float) -> float:
    """x rounded to 11 significant bits, ties away from zero (PTX cvt.rna.tf32.f32), from its exponent."""
    if x == 0.0:
        return x
    mantissa, exponent = math.frexp(abs(x))  # |x| = mantissa * 2**exponent, mantissa in [0.5, 1)
    scaled = mantissa * 2**11
    rounded = math.floor(scaled + 0.5)  # ties away from zero (on the magnitude)
    return math.copysign(rounded * 2.0 ** (exponent - 11), x)


def test_round_to_tf32_is_round_to_nearest_ties_away():
    values = torch.randn(2000) * torch.logspace(-8, 8, 2000)
    # exact ties: 1 + 2**-11 (halfway between 1 and 1 + 2**-10) rounds away from zero, both signs
    ties = torch.tensor([1 + 2**-11, -(1 + 2**-11), 1 + 3 * 2**-11, 0.0], dtype=torch.float32)
    x = torch.cat((values, ties))
    got = mpc_module.round_to_tf32(x)
    want = torch.tensor([_nearest_tf32(float(v)) for v in x], dtype=torch.float64)
    assert torch.equal(got.double(), want)
    assert float(got[-4]) == 1 + 2**-10 and float(got[-3]) == -(1 + 2**-10) and float(got[-2]) == 1 + 2**-9
    # 13 low mantissa bits are zero: the tensor cores read these values exactly
    bits = [struct.unpack("<I", struct.pack("<f", float(v)))[0] for v in got]
    assert all(b & 0x1FFF == 0 for b in bits)


def test_in_kernel_rounding_matches_the_host_rounding():
    """The backward kernel's integer-arithmetic rounding (the interpreter's stand-in for cvt.rna) on the
    weights: the TF32 branch's gradient equals the one computed from host-rounded weights."""
    import triton
    import triton.language as tl

    @triton.jit
    def round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(out_ptr + offs, mpc_module._round_tf32(x, False), mask=offs < n)

    x = torch.randn(1000) * torch.logspace(-5, 5, 1000)
    out = torch.empty_like(x)
    round_kernel[(1,)](x, out, 1000, BLOCK=1024)
    assert torch.equal(out, mpc_module.round_to_tf32(x))


def test_both_backends_share_one_argument_check():
    e = torch.randn(6, 8)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    for loss in (reference.mpc_loss, mpc_module.mpc_loss):
        for bad in (float("nan"), 0.0, -1.0, float("inf")):
            with pytest.raises(ValueError, match="temperature must be > 0 and finite"):
                loss(e, groups, bad)
        with pytest.raises(TypeError, match="integer ids"):
            loss(e, groups.float())
        with pytest.raises(ValueError, match=r"anchor_mask must be \[N\]"):
            loss(e, groups, 0.05, torch.ones(5, dtype=torch.bool))
