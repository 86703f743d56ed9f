"""The attention dropout's keep-mask: 4 keep decisions per Philox-4x32-10 call, a pure function of
(seed, batch*head, query row, key column), checked against an independent NumPy Philox."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton

import kernels.rotary_attention as attention
from kernels.rotary_attention import dropout_keep_mask, dropout_scale, dropout_threshold


def philox4x32_10(counter: list, key: list) -> tuple:
    """Philox-4x32 with 10 rounds (Salmon et al., SC'11) on uint64 arrays holding uint32 values."""
    c0, c1, c2, c3 = (np.asarray(x, dtype=np.uint64) for x in counter)
    k0, k1 = (np.asarray(x, dtype=np.uint64) for x in key)
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    w0, w1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    low, shift = np.uint64(0xFFFFFFFF), np.uint64(32)
    for _ in range(10):
        p0, p1 = m0 * c0, m1 * c2
        c0, c1, c2, c3 = ((p1 >> shift) ^ c1 ^ k0) & low, p1 & low, ((p0 >> shift) ^ c3 ^ k1) & low, p0 & low
        k0, k1 = (k0 + w0) & low, (k1 + w1) & low
    return c0, c1, c2, c3


def test_numpy_philox_matches_the_random123_known_answers():
    assert [int(x) for x in philox4x32_10([0, 0, 0, 0], [0, 0])] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    pi = philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0])
    assert [int(x) for x in pi] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def expected_keep(seed: int, batch_heads: int, seq: int, p: float) -> np.ndarray:
    """[batch*heads, seq, seq] bool: one Philox call per (bh, row, column group of 4); column c takes
    output c % 4; keep iff the draw >= floor(float32(p) * 2**32)."""
    groups = -(-seq // 4)
    bh, row, col = np.meshgrid(np.arange(batch_heads), np.arange(seq), np.arange(seq), indexing="ij")
    counter = ((bh * seq + row) * groups + col // 4).astype(np.uint64)
    outputs = philox4x32_10([counter & np.uint64(0xFFFFFFFF), counter >> np.uint64(32), 0, 0],
                            [seed & 0xFFFFFFFF, seed >> 32])
    draws = np.choose(col % 4, outputs)
    threshold = int(np.float32(p).astype(np.float64) * 2.0**32)
    return draws >= threshold


@pytest.mark.parametrize("seq", [7, 37, 64])
def test_keep_mask_is_the_documented_philox_function_of_the_element(seq):
    seed, batch, heads, p = 987654321, 2, 3, 0.3
    keep = dropout_keep_mask(seed, batch, heads, seq, p)
    want = expected_keep(seed, batch * heads, seq, p).reshape(batch, heads, seq, seq)
    assert np.array_equal(keep.numpy(), want)
    # the comparison can fail: the next group's counters (another Philox block) disagree
    assert not np.array_equal(keep.numpy(), expected_keep(seed + 1, batch * heads, seq, p).reshape(keep.shape))


@pytest.mark.parametrize("blocks", [(16, 16), (16, 8), (32, 64)])
def test_keep_mask_does_not_depend_on_the_block_shape(blocks):
    seed, batch_heads, seq, p = 4242, 3, 45, 0.2
    reference = dropout_keep_mask(seed, 1, batch_heads, seq, p)[0]
    out = torch.zeros((batch_heads, seq, seq), dtype=torch.int8)
    block_m, block_n = blocks
    attention._keep_mask_kernel[(triton.cdiv(seq, block_m), batch_heads)](
        torch.tensor([seed]), out, seq, p, BLOCK_M=block_m, BLOCK_N=block_n)
    assert torch.equal(out.bool(), reference)


def test_threshold_and_scale_of_the_keep_test():
    assert dropout_threshold(0.0) == 0
    assert dropout_threshold(0.5) == 2**31
    p32 = float(np.float32(0.1))
    assert dropout_threshold(0.1) == int(p32 * 2**32)
    # 1 / P(keep) of the uint32 test, which is 1 - p up to 2**-32
    assert dropout_scale(0.1) == pytest.approx(1 / 0.9, rel=1e-8)
    assert dropout_scale(0.5) == 2.0
