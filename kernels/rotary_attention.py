"""Rotary flash attention: Triton forward/backward kernels, autograd Function, user-facing function.

``rotary_attention(q, k, v, cos, sin, attention_mask=None, interleaved=True, softmax_scale=None,
dropout_p=0.0)`` computes non-causal softmax attention with RoPE applied to q and k inside the kernel,
with the semantics of ``kernels.reference.rotary_attention``:

- q, k, v: [batch, seq, heads, head_dim], any strides; the output is [batch, seq, heads, head_dim]
  contiguous in q's dtype;
- attention_mask [batch, seq]: 1 real token, 0 padding (Hugging Face). Padded keys are never
  attended; padded queries still get an output. A sequence with no real token gives zeros.

How: the rotated q and k are never written to memory. Each block loads a contiguous [block, head_dim]
tile of q or k (interleaved pairs (2i, 2i+1): one vectorised, pipelined load, split into the partners
in registers; halves (i, i + d/2): two contiguous half tiles), rotates it in fp32 and feeds one tl.dot
with the features in pair order (x1'_0, x2'_0, x1'_1, ...): the same order for q and k, so q.k is
exact. The forward keeps an online softmax (running max and sum, exp2 domain) and saves the
log-sum-exp per query; the backward computes delta = rowsum(dO o O) in a small preprocessing kernel
and recomputes the probabilities from the log-sum-exp, FlashAttention-2 style: one kernel for dK/dV
(loop over queries), one for dQ (loop over keys), so there are no atomics and results are
deterministic. dQ and dK are rotated back by -theta before they are stored: gradients are for the
unrotated q, k. Any sequence length works (boundary masks, no multiple-of-block restriction). fp32
inputs run in the CPU interpreter only: on a GPU ``kernels.dispatch`` sends fp32 attention to PyTorch's
SDPA (exact fp32 dots have no tensor cores), and this function refuses it.

Dropout on the attention probabilities (``dropout_p > 0``), FlashAttention-2 style, inside the kernels:
the keep-mask Z (keep with probability 1 - p) is never stored. It is regenerated in every kernel from
one Philox seed: one Philox-4x32 call gives the keep decisions of 4 adjacent key columns, counter =
(batch * heads index * seq + query row) * ceil(seq / 4) + key column // 4 (see ``_dropout_keep``), a
function of the element only (not of the block shapes, which the forward and the two backward
kernels choose independently). Keep iff the uint32 draw >= floor(p * 2**32); kept values are scaled
by ``dropout_scale(p)`` = 1 / P(keep). Forward: the normaliser l sums the undropped probabilities P,
the accumulator sums (P o Z / (1 - p)) V. Backward: dV = (P o Z / (1 - p))^T dO,
dP = (dO V^T) o Z / (1 - p), dS = P o (dP - D) with D = rowsum(dO o O) of the (dropped) output.
``DROPOUT`` is a constexpr: with p = 0 the kernels compile exactly as without dropout (no RNG code).
The seed is drawn from torch's default generator of the inputs' device, once per call, so masks
replay under ``torch.manual_seed``, under activation-checkpoint recomputation (which restores the RNG
states) and across resume (the engine restores them). ``dropout_keep_mask`` materialises Z (tests).
"""

from __future__ import annotations

import importlib.util
import os

import torch
import triton
import triton.language as tl

from kernels.autotune import seq_bucket, shared_memory_prune
from kernels.reference import check_attention_args, check_dropout_p, check_rotary_shapes
from kernels.utils import LOG2E, check_kernel_inputs, kernels_interpreted, launch_device, row_max, row_sum

__all__ = ["rotary_attention", "dropout_keep_mask", "draw_dropout_seed"]


def _triton_random():
    """Triton's ``triton.language.random`` (Philox 4x32-10), built for the mode of this module's kernels.

    Its functions are ``@triton.jit`` functions, compiled or interpreted according to TRITON_INTERPRET
    when ``triton.language`` was first imported, and an interpreted kernel cannot call a compiled helper
    (nor the reverse). When the modes differ (tests import the kernels under the interpreter after
    something imported Triton), Triton's own ``triton/language/random.py`` is executed once more,
    privately, in this module's mode: the same code and the same random numbers.
    """
    import triton.language.random as triton_random

    interpreted = kernels_interpreted()  # this module's kernels call kernels.utils' helpers: they share its mode
    if isinstance(triton_random.randint4x, triton.runtime.JITFunction) != interpreted:
        return triton_random
    name = "triton.language._af_random_" + ("interpreted" if interpreted else "compiled")
    spec = importlib.util.spec_from_file_location(name, triton_random.__file__)
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpreted else "0"
    try:
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


_randint4x = _triton_random().randint4x

# Keep decisions per Philox call: one call gives four uint32, one per key column of a group of 4.
KEEP_GROUP = 4
_TWO_POW_32 = 4294967296.0


def dropout_threshold(dropout_p: float) -> int:
    """The uint32 threshold of the keep test ``draw >= threshold``: floor(float32(p) * 2**32), as the
    kernels compute it from the float32 ``dropout_p`` argument (exact: a float32 times a power of 2)."""
    return int(float(torch.tensor(dropout_p, dtype=torch.float32)) * _TWO_POW_32)


def dropout_scale(dropout_p: float) -> float:
    """1 / P(keep) of the kernels' keep test: 2**32 / (2**32 - threshold) (1 / (1 - p) up to 2**-32)."""
    return _TWO_POW_32 / (_TWO_POW_32 - dropout_threshold(dropout_p))


@triton.jit
def _dropout_keep(seed, pid_bh, seq_len, offs_m, start_n, dropout_p,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep-mask Z [BLOCK_M, BLOCK_N] of the attention-probability dropout: query rows offs_m, key
    columns start_n .. start_n + BLOCK_N of one batch*head (start_n a multiple of KEEP_GROUP).

    One Philox call per group of 4 key columns: counter = (pid_bh * seq + row) * ceil(seq / 4) + col // 4
    (int64), and column col takes output col % 4. So Z is a function of (seed, batch*head, row, col)
    only: the same in every kernel and for every block shape (BLOCK_N is a multiple of 4). Keep iff the
    uint32 draw >= floor(p * 2**32): P(keep) = 1 - p up to 2**-32.
    """
    groups_per_row = (seq_len + 3) // 4
    offs_g = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    counters = (pid_bh.to(tl.int64) * seq_len + offs_m[:, None]) * groups_per_row + offs_g[None, :]
    r0, r1, r2, r3 = _randint4x(seed, counters)
    # [M, G, 2, 2] with [m, g, i, j] = r_(2i + j): flattened, column 4g + 2i + j takes output 2i + j.
    draws = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK_M, BLOCK_N])
    threshold = (tl.core.to_tensor(dropout_p) * 4294967296.0).to(tl.uint32)
    return draws >= threshold


@triton.jit
def _load_rotated(
    base_ptr, offs_rows, seq_len, stride_s, stride_d,
    cos_ptr, sin_ptr, stride_cs, stride_cd, stride_ss, stride_sd,
    half_dim, scale,
    INTERLEAVED: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Rows of q or k rotated in fp32, scaled and cast for tl.dot: [BLOCK_ROWS, 2 * BLOCK_HALF] in the
    rotated frame's pair order (x1'_0, x2'_0, x1'_1, x2'_1, ...) whatever the layout, where (x1_i, x2_i)
    are the rotation partners. q.k is a sum over features: the same order for q and k keeps it exact.

    Interleaved pairs (2i, 2i+1): one contiguous [rows, head_dim] tile (vector loads, pipelined), split
    into the partners in registers. Halves (i, i + d/2): two contiguous half tiles.
    """
    offs_i = tl.arange(0, BLOCK_HALF)
    row_ok = offs_rows[:, None] < seq_len
    rows = base_ptr + offs_rows[:, None] * stride_s
    if INTERLEAVED:
        offs_d = tl.arange(0, 2 * BLOCK_HALF)
        x = tl.load(rows + offs_d[None, :] * stride_d, mask=row_ok & (offs_d[None, :] < 2 * half_dim), other=0.0)
        x1, x2 = tl.split(tl.reshape(x.to(tl.float32), [BLOCK_ROWS, BLOCK_HALF, 2]))
    else:
        mask = row_ok & (offs_i[None, :] < half_dim)
        x1 = tl.load(rows + offs_i[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(rows + (offs_i[None, :] + half_dim) * stride_d, mask=mask, other=0.0).to(tl.float32)
    table_mask = row_ok & (offs_i[None, :] < half_dim)
    c = tl.load(cos_ptr + offs_rows[:, None] * stride_cs + offs_i[None, :] * stride_cd, mask=table_mask, other=0.0)
    s = tl.load(sin_ptr + offs_rows[:, None] * stride_ss + offs_i[None, :] * stride_sd, mask=table_mask, other=0.0)
    c = c.to(tl.float32)
    s = s.to(tl.float32)
    r1 = (x1 * c - x2 * s) * scale
    r2 = (x2 * c + x1 * s) * scale
    return tl.reshape(tl.join(r1, r2), [BLOCK_ROWS, 2 * BLOCK_HALF]).to(DOT_DTYPE)


@triton.jit
def _store_unrotated(
    base_ptr, offs_rows, seq_len, stride_s, stride_d, grad,
    cos_ptr, sin_ptr, stride_cs, stride_cd, stride_ss, stride_sd,
    half_dim, INTERLEAVED: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Rotate a gradient [BLOCK_ROWS, 2 * BLOCK_HALF] (rotated frame, pair order as ``_load_rotated``)
    back by -theta and store it at the partners' places."""
    offs_i = tl.arange(0, BLOCK_HALF)
    row_ok = offs_rows[:, None] < seq_len
    table_mask = row_ok & (offs_i[None, :] < half_dim)
    c = tl.load(cos_ptr + offs_rows[:, None] * stride_cs + offs_i[None, :] * stride_cd, mask=table_mask, other=0.0)
    s = tl.load(sin_ptr + offs_rows[:, None] * stride_ss + offs_i[None, :] * stride_sd, mask=table_mask, other=0.0)
    c = c.to(tl.float32)
    s = s.to(tl.float32)
    g1, g2 = tl.split(tl.reshape(grad, [BLOCK_ROWS, BLOCK_HALF, 2]))
    x1 = g1 * c + g2 * s
    x2 = g2 * c - g1 * s
    rows = base_ptr + offs_rows[:, None] * stride_s
    if INTERLEAVED:
        offs_d = tl.arange(0, 2 * BLOCK_HALF)
        x = tl.reshape(tl.join(x1, x2), [BLOCK_ROWS, 2 * BLOCK_HALF])
        tl.store(rows + offs_d[None, :] * stride_d, x.to(base_ptr.dtype.element_ty),
                 mask=row_ok & (offs_d[None, :] < 2 * half_dim))
    else:
        tl.store(rows + offs_i[None, :] * stride_d, x1.to(base_ptr.dtype.element_ty), mask=table_mask)
        tl.store(rows + (offs_i[None, :] + half_dim) * stride_d, x2.to(base_ptr.dtype.element_ty), mask=table_mask)


@triton.jit
def _key_valid(mask_ptr, stride_mb, stride_ms, batch_idx, offs_n, seq_len, HAS_MASK: tl.constexpr):
    valid = offs_n < seq_len
    if HAS_MASK:
        keep = tl.load(mask_ptr + batch_idx * stride_mb + offs_n * stride_ms, mask=valid, other=0)
        valid = valid & (keep != 0)
    return valid


@triton.jit(do_not_specialize=["seq_bucket"])
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, mask_ptr, out_ptr, lse_ptr, seed_ptr,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_cs, stride_cd, stride_ss, stride_sd, stride_mb, stride_ms,
    n_heads, seq_len, seq_bucket, half_dim, head_dim, qk_scale, dropout_p, dropout_scale,
    HAS_MASK: tl.constexpr, INTERLEAVED: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # seq_bucket: unused here; the autotuner's key (lengths in one bucket share the tuned config).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    # UPCAST_DOT: fp32 tl.dot operands (Triton's CPU interpreter computes bf16 dots wrongly).
    dot_dtype = tl.float32 if UPCAST_DOT else q_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    # q carries softmax_scale * log2(e): scores come out in the exp2 domain.
    q = _load_rotated(q_ptr + b * stride_qb + h * stride_qh, offs_m, seq_len, stride_qs, stride_qd, cos_ptr, sin_ptr,
                      stride_cs, stride_cd, stride_ss, stride_sd, half_dim, qk_scale,
                      INTERLEAVED, BLOCK_M, BLOCK_HALF, dot_dtype)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rotated(k_base, offs_n, seq_len, stride_ks, stride_kd, cos_ptr, sin_ptr,
                          stride_cs, stride_cd, stride_ss, stride_sd, half_dim, 1.0,
                          INTERLEAVED, BLOCK_N, BLOCK_HALF, dot_dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        valid = _key_valid(mask_ptr, stride_mb, stride_ms, b, offs_n, seq_len, HAS_MASK)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, row_max(scores))
        # A row whose keys are all masked so far keeps m = -inf; shift by 0 instead (no inf - inf).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + row_sum(p)
        if DROPOUT:
            # l keeps the undropped probabilities; 1 / (1 - p) is applied once, at the end.
            keep = _dropout_keep(seed, pid_bh, seq_len, offs_m, start_n, dropout_p, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        v_mask = (offs_n[:, None] < seq_len) & (offs_d[None, :] < head_dim)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=v_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), v.to(dot_dtype), input_precision=DOT_PRECISION)
        m_i = m_new
    # Fully padded sequence: l = 0 -> output 0 and lse = +inf (its backward probabilities are 0).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * dropout_scale
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    o_mask = (offs_m[:, None] < seq_len) & (offs_d[None, :] < head_dim)
    o_ptrs = out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)
    tl.store(lse_ptr + pid_bh * seq_len + offs_m, lse, mask=offs_m < seq_len)


@triton.jit
def _attn_bwd_delta_kernel(
    out_ptr, do_ptr, delta_ptr,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_dob, stride_dos, stride_doh, stride_dod,
    n_heads, seq_len, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b * heads + h, s] = sum_d dO * O in fp32 (the backward's preprocessing step): one pass over
    O and dO, no fp32 [B, S, H, D] temporaries."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seq_len) & (offs_d[None, :] < head_dim)
    o = tl.load(out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_bh * seq_len + offs_m, row_sum(o * do), mask=offs_m < seq_len)


@triton.jit(do_not_specialize=["seq_bucket"])
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, seed_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    stride_cs, stride_cd, stride_ss, stride_sd, stride_mb, stride_ms,
    n_heads, seq_len, seq_bucket, half_dim, head_dim, qk_scale, sm_scale, dropout_p, dropout_scale,
    HAS_MASK: tl.constexpr, INTERLEAVED: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    # UPCAST_DOT: fp32 tl.dot operands (Triton's CPU interpreter computes bf16 dots wrongly).
    dot_dtype = tl.float32 if UPCAST_DOT else q_ptr.dtype.element_ty
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    k = _load_rotated(k_ptr + b * stride_kb + h * stride_kh, offs_n, seq_len, stride_ks, stride_kd, cos_ptr, sin_ptr,
                      stride_cs, stride_cd, stride_ss, stride_sd, half_dim, 1.0,
                      INTERLEAVED, BLOCK_N, BLOCK_HALF, dot_dtype)
    nd_mask = (offs_n[:, None] < seq_len) & (offs_d[None, :] < head_dim)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=nd_mask, other=0.0).to(dot_dtype)
    valid = _key_valid(mask_ptr, stride_mb, stride_ms, b, offs_n, seq_len, HAS_MASK)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    for start_m in range(0, seq_len, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rotated(q_base, offs_m, seq_len, stride_qs, stride_qd, cos_ptr, sin_ptr,
                          stride_cs, stride_cd, stride_ss, stride_sd, half_dim, qk_scale,
                          INTERLEAVED, BLOCK_M, BLOCK_HALF, dot_dtype)
        in_seq = offs_m < seq_len
        lse = tl.load(lse_ptr + pid_bh * seq_len + offs_m, mask=in_seq, other=float("inf"))
        delta = tl.load(delta_ptr + pid_bh * seq_len + offs_m, mask=in_seq, other=0.0)
        md_mask = in_seq[:, None] & (offs_d[None, :] < head_dim)
        do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod, mask=md_mask,
                     other=0.0).to(dot_dtype)
        # Transposed tile [keys, queries]: P^T = exp2(S^T - lse).
        scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        scores_t = tl.where(valid[:, None], scores_t, float("-inf"))
        p_t = tl.exp2(scores_t - lse[None, :])
        pd_t = p_t
        if DROPOUT:
            # Z^T of this tile: the forward's (query row, key col) mask, transposed.
            keep_t = tl.trans(_dropout_keep(seed, pid_bh, seq_len, offs_m, start_n, dropout_p, BLOCK_M, BLOCK_N))
            pd_t = tl.where(keep_t, p_t * dropout_scale, 0.0)
        dv += tl.dot(pd_t.to(dot_dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            dp_t = tl.where(keep_t, dp_t * dropout_scale, 0.0)
        ds_t = (p_t * (dp_t - delta[None, :])).to(dot_dtype)
        dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)
    # q carried softmax_scale * log2(e); the logits' gradient needs softmax_scale only.
    dk = dk * (sm_scale / qk_scale)
    _store_unrotated(dk_ptr + b * stride_dkb + h * stride_dkh, offs_n, seq_len, stride_dks, stride_dkd,
                     dk, cos_ptr, sin_ptr, stride_cs, stride_cd, stride_ss, stride_sd,
                     half_dim, INTERLEAVED, BLOCK_N, BLOCK_HALF)
    dv_ptrs = dv_ptr + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=nd_mask)


@triton.jit(do_not_specialize=["seq_bucket"])
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, seed_ptr, dq_ptr,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    stride_cs, stride_cd, stride_ss, stride_sd, stride_mb, stride_ms,
    n_heads, seq_len, seq_bucket, half_dim, head_dim, qk_scale, sm_scale, dropout_p, dropout_scale,
    HAS_MASK: tl.constexpr, INTERLEAVED: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    # UPCAST_DOT: fp32 tl.dot operands (Triton's CPU interpreter computes bf16 dots wrongly).
    dot_dtype = tl.float32 if UPCAST_DOT else q_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    q = _load_rotated(q_ptr + b * stride_qb + h * stride_qh, offs_m, seq_len, stride_qs, stride_qd,
                      cos_ptr, sin_ptr, stride_cs, stride_cd, stride_ss, stride_sd, half_dim, qk_scale,
                      INTERLEAVED, BLOCK_M, BLOCK_HALF, dot_dtype)
    in_seq = offs_m < seq_len
    lse = tl.load(lse_ptr + pid_bh * seq_len + offs_m, mask=in_seq, other=float("inf"))
    delta = tl.load(delta_ptr + pid_bh * seq_len + offs_m, mask=in_seq, other=0.0)
    md_mask = in_seq[:, None] & (offs_d[None, :] < head_dim)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                 mask=md_mask, other=0.0).to(dot_dtype)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rotated(k_base, offs_n, seq_len, stride_ks, stride_kd, cos_ptr, sin_ptr,
                          stride_cs, stride_cd, stride_ss, stride_sd, half_dim, 1.0,
                          INTERLEAVED, BLOCK_N, BLOCK_HALF, dot_dtype)
        nd_mask = (offs_n[:, None] < seq_len) & (offs_d[None, :] < head_dim)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=nd_mask,
                    other=0.0).to(dot_dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        valid = _key_valid(mask_ptr, stride_mb, stride_ms, b, offs_n, seq_len, HAS_MASK)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        p = tl.exp2(scores - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, pid_bh, seq_len, offs_m, start_n, dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = (p * (dp - delta[:, None])).to(dot_dtype)
        dq += tl.dot(ds, k, input_precision=DOT_PRECISION)
    dq = dq * sm_scale
    _store_unrotated(dq_ptr + b * stride_dqb + h * stride_dqh, offs_m, seq_len, stride_dqs, stride_dqd,
                     dq, cos_ptr, sin_ptr, stride_cs, stride_cd, stride_ss, stride_sd,
                     half_dim, INTERLEAVED, BLOCK_M, BLOCK_HALF)


def _configs(shapes) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# One list per kernel (BLOCK_M, BLOCK_N, warps, stages), for H100/H200: chosen from
# tools/kernel_compile_report.py (ptxas: no spills and wgmma at head_dim 64, bf16, dropout on and off).
# The forward keeps a [BLOCK_M, D] accumulator and streams keys; dK/dV keeps two [BLOCK_N, D] fp32
# accumulators (k, v resident) and streams queries; dQ keeps one [BLOCK_M, D] and streams keys.
# BLOCK_N is a multiple of KEEP_GROUP (the dropout mask's column groups).
FWD_CONFIGS = _configs(((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2),
                        (64, 64, 4, 2)))
DKDV_CONFIGS = _configs(((32, 64, 4, 3), (32, 128, 8, 2), (32, 64, 4, 2), (32, 128, 8, 3), (64, 64, 8, 2),
                         (16, 128, 8, 3)))
DQ_CONFIGS = _configs(((64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 64, 8, 3), (64, 64, 8, 2),
                       (128, 32, 8, 2)))


def _element_size(args: dict) -> int:
    return args["q_ptr"].element_size()


def _fwd_shared_bytes(config: triton.Config, args: dict) -> int:
    """Estimated shared memory of the forward: per pipeline stage a K and a V tile and their cos/sin rows,
    plus the q and rotated-k dot operands."""
    m, n, e = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], _element_size(args)
    d, half = args["BLOCK_D"], args["BLOCK_HALF"]
    return config.num_stages * n * (2 * d * e + 2 * half * 4 + 4) + (m + n) * d * e


def _dkdv_shared_bytes(config: triton.Config, args: dict) -> int:
    """dK/dV: per stage a q and a dO tile with their cos/sin rows and lse/delta; k, v and rotated q."""
    m, n, e = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], _element_size(args)
    d, half = args["BLOCK_D"], args["BLOCK_HALF"]
    return config.num_stages * m * (2 * d * e + 2 * half * 4 + 8) + (2 * n + m) * d * e + m * n * e


def _dq_shared_bytes(config: triton.Config, args: dict) -> int:
    """dQ: per stage a K and a V tile with their cos/sin rows; q, dO and rotated k."""
    m, n, e = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], _element_size(args)
    d, half = args["BLOCK_D"], args["BLOCK_HALF"]
    return config.num_stages * n * (2 * d * e + 2 * half * 4 + 4) + (2 * m + n) * d * e + m * n * e


# The key buckets the length (seq_bucket), so dynamic padding does not re-tune for every new length.
_TUNE_KEY = ["seq_bucket", "head_dim", "HAS_MASK", "INTERLEAVED", "DOT_PRECISION", "DROPOUT"]
_attn_fwd_tuned = triton.autotune(configs=FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by={
    "early_config_prune": shared_memory_prune(_fwd_shared_bytes)})(_attn_fwd_kernel)
_attn_bwd_dkdv_tuned = triton.autotune(configs=DKDV_CONFIGS, key=_TUNE_KEY, prune_configs_by={
    "early_config_prune": shared_memory_prune(_dkdv_shared_bytes)})(_attn_bwd_dkdv_kernel)
_attn_bwd_dq_tuned = triton.autotune(configs=DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by={
    "early_config_prune": shared_memory_prune(_dq_shared_bytes)})(_attn_bwd_dq_kernel)
# The delta preprocessing kernel: one config (a bandwidth-bound row reduction).
DELTA_CONFIG = triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1)


def _interpreter_blocks(seq_len: int) -> dict[str, int]:
    # The interpreter's cost is per operation, not per element: large blocks, one fixed config.
    block = min(64, max(16, triton.next_power_of_2(seq_len)))
    return {"BLOCK_M": block, "BLOCK_N": block}


def _launch(kernel, tuned, seq_len: int, batch_heads: int, args: tuple, meta: dict, device) -> None:
    if kernels_interpreted():
        blocks = _interpreter_blocks(seq_len)
        row_block = blocks["BLOCK_N"] if kernel is _attn_bwd_dkdv_kernel else blocks["BLOCK_M"]
        kernel[(triton.cdiv(seq_len, row_block), batch_heads)](*args, **meta, **blocks)
        return
    row_key = "BLOCK_N" if kernel is _attn_bwd_dkdv_kernel else "BLOCK_M"
    grid = lambda m: (triton.cdiv(seq_len, m[row_key]), batch_heads)
    with launch_device(device):
        tuned[grid](*args, **meta)


def _launch_delta(out: torch.Tensor, grad_out: torch.Tensor, delta: torch.Tensor, heads: int, block_d: int) -> None:
    batch, seq, _, head_dim = out.shape
    args = (out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, seq, head_dim)
    block_m = DELTA_CONFIG.kwargs["BLOCK_M"]
    grid = (triton.cdiv(seq, block_m), batch * heads)
    if kernels_interpreted():
        _attn_bwd_delta_kernel[grid](*args, BLOCK_M=block_m, BLOCK_D=block_d)
        return
    with launch_device(out.device):
        _attn_bwd_delta_kernel[grid](*args, BLOCK_D=block_d, **DELTA_CONFIG.all_kwargs())


def _upcast(q: torch.Tensor) -> bool:
    return kernels_interpreted() and q.dtype == torch.bfloat16


def _dims(q: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    batch, seq, heads, head_dim = q.shape
    half = head_dim // 2
    # tl.dot needs every block dimension >= 16; the rotated tile is [rows, 2 * BLOCK_HALF] = BLOCK_D.
    block_d = max(32, triton.next_power_of_2(head_dim))
    return batch, seq, heads, half, block_d // 2, block_d


def draw_dropout_seed(device: torch.device | str) -> torch.Tensor:
    """The Philox seed of one dropout call: one int64 in [0, 2**31 - 1) drawn from torch's default
    generator of ``device``, kept as a 1-element tensor on that device.

    The default generator makes the masks follow torch.manual_seed, activation-checkpoint
    recomputation (torch.utils.checkpoint restores the CPU and device RNG states before re-running the
    forward) and resume (the engine saves and restores the RNG states). The kernels load the seed from
    memory rather than taking a host int: ``.item()`` on a CUDA tensor would synchronise the stream on
    every attention call, and Triton specialises integer arguments (e.g. on divisibility by 16), which
    would compile some kernels twice.
    """
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


@triton.jit
def _keep_mask_kernel(seed_ptr, out_ptr, seq_len, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seed = tl.load(seed_ptr)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    for start_n in range(0, seq_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, pid_bh, seq_len, offs_m, start_n, dropout_p, BLOCK_M, BLOCK_N)
        ptrs = out_ptr + (pid_bh.to(tl.int64) * seq_len + offs_m[:, None]) * seq_len + offs_n[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < seq_len) & (offs_n[None, :] < seq_len))


def dropout_keep_mask(
    seed: int | torch.Tensor, batch: int, heads: int, seq: int, dropout_p: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The kernels' keep-mask Z as a bool tensor [batch, heads, seq (query), seq (key)] (for tests).

    Same Philox counters as the attention kernels (``_dropout_keep``), generated by a tiny Triton
    kernel, so a reference can apply the exact mask: ``seed`` is what ``draw_dropout_seed`` returned
    for the call (a tensor or its int value). Needs CUDA, or TRITON_INTERPRET=1 (CPU).
    """
    dropout_p = check_dropout_p("dropout_keep_mask", dropout_p)
    if isinstance(seed, torch.Tensor):
        device = seed.device if device is None else device
        seed = int(seed.reshape(-1)[0])
    if device is None:
        device = "cpu" if kernels_interpreted() else "cuda"
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    out = torch.empty((batch, heads, seq, seq), dtype=torch.int8, device=device)
    check_kernel_inputs("dropout_keep_mask", seed_t, out)
    _launch_keep_mask(seed_t, out, dropout_p)
    return out.bool()


def _launch_keep_mask(seed: torch.Tensor, out: torch.Tensor, dropout_p: float) -> None:
    """Fill ``out`` int8 [batch, heads, seq, seq] with the keep-mask of the 1-element ``seed`` tensor."""
    batch, heads, seq, _ = out.shape
    if out.numel():
        block = 64
        grid = (triton.cdiv(seq, block), batch * heads)
        with launch_device(out.device):
            _keep_mask_kernel[grid](seed, out, seq, dropout_p, BLOCK_M=block, BLOCK_N=block)


class _RotaryAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cos, sin, mask, interleaved: bool, softmax_scale: float, dropout_p: float):
        batch, seq, heads, half, block_half, block_d = _dims(q)
        head_dim = q.shape[-1]
        out = torch.empty((batch, seq, heads, head_dim), dtype=q.dtype, device=q.device)
        lse = torch.empty((batch * heads, seq), dtype=torch.float32, device=q.device)
        has_mask = mask is not None
        mask_arg = mask if has_mask else lse  # never read when HAS_MASK is False
        mask_strides = mask.stride() if has_mask else (0, 0)
        dropout = dropout_p > 0.0
        seed = draw_dropout_seed(q.device) if dropout else None
        seed_arg = seed if dropout else lse  # never read when DROPOUT is False
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        qk_scale = softmax_scale * LOG2E
        args = (
            q, k, v, cos, sin, mask_arg, out, lse, seed_arg,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *cos.stride(), *sin.stride(), *mask_strides,
            heads, seq, seq_bucket(seq), half, head_dim, qk_scale, float(dropout_p), dropout_scale(dropout_p),
        )
        meta = dict(HAS_MASK=has_mask, INTERLEAVED=interleaved, DOT_PRECISION=precision, UPCAST_DOT=_upcast(q),
                    DROPOUT=dropout, BLOCK_HALF=block_half, BLOCK_D=block_d)
        _launch(_attn_fwd_kernel, _attn_fwd_tuned, seq, batch * heads, args, meta, q.device)
        ctx.save_for_backward(q, k, v, cos, sin, mask, out, lse, seed)
        ctx.interleaved = interleaved
        ctx.softmax_scale = softmax_scale
        ctx.dropout_p = dropout_p
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, cos, sin, mask, out, lse, seed = ctx.saved_tensors
        batch, seq, heads, half, block_half, block_d = _dims(q)
        head_dim = q.shape[-1]
        # delta_i = sum_d dO_i * O_i, the softmax-Jacobian correction, laid out like lse. With dropout O is
        # the dropped output, and this equals rowsum(P o dP) with dP = (dO V^T) o Z / (1 - p).
        delta = torch.empty((batch * heads, seq), dtype=torch.float32, device=q.device)
        _launch_delta(out, grad_out, delta, heads, block_d)
        dq = torch.empty((batch, seq, heads, head_dim), dtype=q.dtype, device=q.device)
        dk = torch.empty_like(dq, dtype=k.dtype)
        dv = torch.empty_like(dq, dtype=v.dtype)
        has_mask = mask is not None
        mask_arg = mask if has_mask else lse
        mask_strides = mask.stride() if has_mask else (0, 0)
        dropout = ctx.dropout_p > 0.0
        seed_arg = seed if dropout else lse
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        qk_scale = ctx.softmax_scale * LOG2E
        common = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
        tables = (*cos.stride(), *sin.stride(), *mask_strides)
        scalars = (heads, seq, seq_bucket(seq), half, head_dim, qk_scale, ctx.softmax_scale,
                   float(ctx.dropout_p), dropout_scale(ctx.dropout_p))
        meta = dict(HAS_MASK=has_mask, INTERLEAVED=ctx.interleaved, DOT_PRECISION=precision, UPCAST_DOT=_upcast(q),
                    DROPOUT=dropout, BLOCK_HALF=block_half, BLOCK_D=block_d)
        dkdv_args = (q, k, v, cos, sin, mask_arg, grad_out, lse, delta, seed_arg, dk, dv,
                     *common, *dk.stride(), *dv.stride(), *tables, *scalars)
        _launch(_attn_bwd_dkdv_kernel, _attn_bwd_dkdv_tuned, seq, batch * heads, dkdv_args, meta, q.device)
        dq_args = (q, k, v, cos, sin, mask_arg, grad_out, lse, delta, seed_arg, dq,
                   *common, *dq.stride(), *tables, *scalars)
        _launch(_attn_bwd_dq_kernel, _attn_bwd_dq_tuned, seq, batch * heads, dq_args, meta, q.device)
        return dq, dk, dv, None, None, None, None, None, None


def rotary_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    interleaved: bool = True,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Non-causal attention with RoPE applied to q and k inside the kernel (Triton).

    q, k, v: [batch, seq, heads, head_dim] (any strides, float32/float16/bfloat16, even head_dim);
    cos, sin: [seq, head_dim // 2]; attention_mask: [batch, seq], nonzero for real tokens.
    ``softmax_scale`` defaults to head_dim ** -0.5. Gradients flow to q, k, v (not to the tables).
    ``dropout_p`` in [0, 1): dropout on the attention probabilities (inverted: kept ones scaled by
    1 / (1 - p)), applied whenever > 0 (the caller passes 0 in eval mode); the mask comes from torch's
    default generator of the inputs' device (see ``draw_dropout_seed``).
    """
    dropout_p = check_attention_args(q, k, v, attention_mask, dropout_p)
    check_rotary_shapes(q, cos, sin)
    tensors = (q, k, v, cos, sin) + (() if attention_mask is None else (attention_mask,))
    check_kernel_inputs("rotary_attention", *tensors)
    if len({q.dtype, k.dtype, v.dtype}) > 1:
        raise TypeError(f"rotary_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rotary_attention (Triton) gives no gradients for cos/sin; detach the tables")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    mask = None
    if attention_mask is not None:
        # int32 [batch, seq]: a cheap copy that spares the kernel bool/int64 pointer handling.
        mask = attention_mask.to(torch.int32)
    if q.dtype == torch.float32 and not kernels_interpreted():
        # kernels.dispatch sends fp32 on a GPU to PyTorch's SDPA; the configs were chosen and compiled
        # (tools/kernel_compile_report.py) for 16-bit inputs only.
        raise TypeError(
            "rotary_attention (Triton): float32 on a GPU goes to PyTorch's SDPA, not to this kernel (exact fp32 "
            "dots have no tensor cores); call kernels.dispatch.rotary_attention, or pass float16/bfloat16"
        )
    if q.numel() == 0:
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device) + 0 * (q.sum() + k.sum() + v.sum())
    return _RotaryAttention.apply(q, k, v, cos, sin, mask, interleaved, scale, dropout_p)
