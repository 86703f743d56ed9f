"""Tiled multi-positive contrastive (MPC) loss: Triton kernels, autograd Function, user-facing function.

``mpc_loss(embeddings, groups, temperature=0.05, anchor_mask=None)`` has the semantics of
``kernels.reference.mpc_loss`` (docs/ARCHITECTURE.md, "Kernel formulas"): for anchor i with positives
P(i) (same group, not i),

    loss_i = logsumexp_{a != i}(s_ia / t) - (1 / |P(i)|) sum_{p in P(i)} s_ip / t,

averaged over the anchors that have a positive (and are selected by ``anchor_mask``).

The N x N similarity matrix is never stored; memory is O(N * D):
- the positive term needs only per-group sums of the normalised embeddings:
  sum_{p in P(i)} s_ip = z_i . (G_g(i) - z_i) with G_g = sum_{j in g} z_j (O(N * D); summed in a fixed
  order, no atomics, so the loss is the same bits on every run);
- the off-diagonal log-sum-exp is the Triton part. Forward: each program owns a block of anchors
  and streams over all rows tile by tile with an online log-sum-exp. Backward: with upstream
  gradient g and P_ia = exp(s_ia / t - lse_i), the gradient is
      dL/dz_j = (1/t) sum_a (g_j P_ja + g_a P_aj) z_a,
  the two softmax-weighted sums, recomputed tile by tile (s is symmetric, so P_aj needs only
  lse_a). Each program owns a block of rows and a slice of the feature dimension: no atomics.
- the L2 normalisation, the positive term and the log-sum-exp form one autograd Function with a
  hand-written backward (checked against autograd of the reference): it keeps only the input and
  O(N) vectors, recomputes z in the backward, and works in row chunks, so the extra memory is a
  few N x D float32 buffers at most.

Dot products run on the TF32 tensor cores on CUDA, with operands rounded to TF32 to nearest first (z
once on the host, the backward's weights in the kernel with PTX cvt.rna): the tensor cores would
truncate raw fp32, which biases the log-sum-exp (about -1.3e-2 on the loss at N = 2048, D = 768,
t = 0.05). Exact fp32 in the interpreter. The result is a float32 scalar.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.autotune import shared_memory_prune
from kernels.reference import check_mpc_args
from kernels.utils import LOG2E, check_kernel_inputs, kernels_interpreted, launch_device, row_max, row_sum

__all__ = ["mpc_loss", "off_diagonal_logsumexp"]


@triton.jit
def _round_tf32(x, ASM: tl.constexpr):
    """fp32 -> the nearest TF32 value (10 mantissa bits; ties away from zero), still stored as fp32.
    The tensor cores truncate fp32 operands to TF32, a bias; already-rounded operands are exact.
    ASM: PTX ``cvt.rna.tf32.f32`` (compiled); else the same rounding in integer arithmetic."""
    if ASM:
        return tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    bits = x.to(tl.uint32, bitcast=True)
    return (((bits + 0x1000) >> 13) << 13).to(tl.float32, bitcast=True)


@triton.jit
def _similarity_tile(z_ptr, offs_m, offs_n, n_rows, dim, stride_zn, stride_zd,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """s[m, n] = z_m . z_n for a [BLOCK_M, BLOCK_N] tile, accumulated over feature chunks."""
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
    for start_k in range(0, dim, BLOCK_K):
        offs_k = start_k + tl.arange(0, BLOCK_K)
        k_ok = offs_k < dim
        a = tl.load(z_ptr + offs_m[:, None] * stride_zn + offs_k[None, :] * stride_zd,
                    mask=(offs_m[:, None] < n_rows) & k_ok[None, :], other=0.0).to(tl.float32)
        b = tl.load(z_ptr + offs_n[:, None] * stride_zn + offs_k[None, :] * stride_zd,
                    mask=(offs_n[:, None] < n_rows) & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _mpc_lse_fwd_kernel(
    z_ptr, lse_ptr, n_rows, dim, stride_zn, stride_zd, logit_scale,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    for start_n in range(0, n_rows, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # logit_scale = log2(e) / temperature: logits in the exp2 domain.
        logits = _similarity_tile(z_ptr, offs_m, offs_n, n_rows, dim, stride_zn, stride_zd,
                                  BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION) * logit_scale
        keep = (offs_n[None, :] < n_rows) & (offs_m[:, None] != offs_n[None, :])
        logits = tl.where(keep, logits, float("-inf"))
        m_new = tl.maximum(m_i, row_max(logits))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_shift) + row_sum(tl.exp2(logits - m_shift[:, None]))
        m_i = m_new
    # Natural-log units; a lone row (N = 1) has no other row: lse = -inf.
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i))) * 0.6931471805599453)
    tl.store(lse_ptr + offs_m, lse, mask=offs_m < n_rows)


@triton.jit
def _mpc_lse_bwd_kernel(
    z_ptr, lse_ptr, grad_lse_ptr, grad_z_ptr, n_rows, dim,
    stride_zn, stride_zd, stride_gn, stride_gd, logit_scale, inv_temperature,
    DOT_PRECISION: tl.constexpr, ROUND_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DOUT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dout = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    row_ok = offs_m < n_rows
    g_m = tl.load(grad_lse_ptr + offs_m, mask=row_ok, other=0.0)
    lse_m = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
    # Rows with a zero upstream gradient (non-anchors, excluded anchors) or no other row (lse = -inf)
    # contribute nothing: lse = +inf makes their weights exactly 0, with no 0 * inf.
    lse_m = tl.where((g_m != 0.0) & (lse_m != float("-inf")), lse_m * 1.4426950408889634, float("inf"))
    acc = tl.full([BLOCK_M, BLOCK_DOUT], 0.0, dtype=tl.float32)
    for start_n in range(0, n_rows, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < n_rows
        g_n = tl.load(grad_lse_ptr + offs_n, mask=col_ok, other=0.0)
        lse_n = tl.load(lse_ptr + offs_n, mask=col_ok, other=0.0)
        lse_n = tl.where((g_n != 0.0) & (lse_n != float("-inf")), lse_n * 1.4426950408889634, float("inf"))
        logits = _similarity_tile(z_ptr, offs_m, offs_n, n_rows, dim, stride_zn, stride_zd,
                                  BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION) * logit_scale
        keep = row_ok[:, None] & col_ok[None, :] & (offs_m[:, None] != offs_n[None, :])
        logits = tl.where(keep, logits, float("-inf"))
        # W_ma = g_m P_ma + g_a P_am, with P_am = exp(s_ma / t - lse_a) by symmetry of s.
        weights = g_m[:, None] * tl.exp2(logits - lse_m[:, None]) + g_n[None, :] * tl.exp2(logits - lse_n[None, :])
        if DOT_PRECISION == "tf32":
            weights = _round_tf32(weights, ROUND_ASM)
        z_n = tl.load(z_ptr + offs_n[:, None] * stride_zn + offs_dout[None, :] * stride_zd,
                      mask=col_ok[:, None] & (offs_dout[None, :] < dim), other=0.0).to(tl.float32)
        acc += tl.dot(weights, z_n, input_precision=DOT_PRECISION)
    acc = acc * inv_temperature
    tl.store(grad_z_ptr + offs_m[:, None] * stride_gn + offs_dout[None, :] * stride_gd, acc,
             mask=row_ok[:, None] & (offs_dout[None, :] < dim))


def _fwd_configs() -> list[triton.Config]:
    # H100: matmul-like tiles over the feature dimension (D = 768 typical); a short list because
    # every config is compiled on the first call. Chosen from tools/kernel_compile_report.py (no spills).
    shapes = ((128, 128, 32, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
              (64, 64, 64, 4, 3), (128, 128, 32, 8, 4))
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def _bwd_configs() -> list[triton.Config]:
    # BLOCK_DOUT: the slice of the feature dimension one program accumulates (fp32 registers);
    # D / BLOCK_DOUT programs per row block recompute the same similarity tiles. The prune keeps the
    # BLOCK_DOUT that divide D (no half-masked extra program).
    shapes = ((64, 64, 64, 256, 8, 2), (64, 64, 32, 128, 4, 2), (128, 64, 32, 128, 8, 2),
              (64, 128, 64, 128, 8, 2), (64, 64, 32, 256, 8, 3))
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "BLOCK_DOUT": d}, num_warps=w, num_stages=s)
            for m, n, k, d, w, s in shapes]


def _fwd_shared_bytes(config: triton.Config, args: dict) -> int:
    """Estimated shared memory: per pipeline stage a [BLOCK_M, BLOCK_K] and a [BLOCK_N, BLOCK_K] fp32 tile."""
    kw = config.kwargs
    return config.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * 4


def _bwd_shared_bytes(config: triton.Config, args: dict) -> int:
    """The larger of the similarity loop's tiles and a double-buffered [BLOCK_N, BLOCK_DOUT] z tile (the
    compiler reuses the buffers between the two phases; an upper bound of what ptxas reported)."""
    kw = config.kwargs
    return max(_fwd_shared_bytes(config, args), 2 * kw["BLOCK_N"] * kw["BLOCK_DOUT"] * 4)


def _bwd_prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Shared memory first, then the BLOCK_DOUT that divide D (all that fit when none does)."""
    fitting = shared_memory_prune(_bwd_shared_bytes)(configs, named_args, **kwargs)
    dim = named_args["dim"]
    dividing = [config for config in fitting if dim % config.kwargs["BLOCK_DOUT"] == 0]
    return dividing or fitting


_mpc_lse_fwd_tuned = triton.autotune(configs=_fwd_configs(), key=["n_rows", "dim", "DOT_PRECISION"],
                                     prune_configs_by={"early_config_prune": shared_memory_prune(_fwd_shared_bytes)})(
    _mpc_lse_fwd_kernel
)
# grad_z is fully overwritten by each trial: no reset needed.
_mpc_lse_bwd_tuned = triton.autotune(configs=_bwd_configs(), key=["n_rows", "dim", "DOT_PRECISION"],
                                     prune_configs_by={"early_config_prune": _bwd_prune})(_mpc_lse_bwd_kernel)


def _compiled() -> bool:
    """Whether the MPC kernels really are compiled (PTX inline assembly is then available). Unlike
    ``kernels_interpreted``, never stood in for by the tests of the CUDA launch branch."""
    return isinstance(_mpc_lse_bwd_kernel, triton.runtime.JITFunction)


def round_to_tf32(z: torch.Tensor) -> torch.Tensor:
    """float32 z rounded to the nearest TF32 value (ties away from zero, as PTX cvt.rna.tf32.f32), still
    float32: the tensor cores then read it exactly instead of truncating it (a bias of the loss)."""
    bits = z.contiguous().view(torch.int32)
    # sign-magnitude: adding half an ulp of TF32 to the magnitude bits rounds to nearest, ties away.
    rounded = ((bits + 0x1000) >> 13) << 13
    return rounded.view(torch.float32)


def _interpreter_blocks(n_rows: int, dim: int) -> dict[str, int]:
    # One fixed, large configuration: the interpreter pays per operation, not per element.
    rows = min(64, max(16, triton.next_power_of_2(n_rows)))
    return {"BLOCK_M": rows, "BLOCK_N": rows, "BLOCK_K": min(128, max(16, triton.next_power_of_2(dim)))}


def _lse_forward(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """lse [N] float32 of the off-diagonal logits of z [N, D] float32 (Triton, tile by tile)."""
    n_rows, dim = z.shape
    lse = torch.empty(n_rows, dtype=torch.float32, device=z.device)
    precision = "ieee" if kernels_interpreted() else "tf32"
    if precision == "tf32":
        z = round_to_tf32(z)
    args = (z, lse, n_rows, dim, *z.stride(), LOG2E / temperature)
    if kernels_interpreted():
        blocks = _interpreter_blocks(n_rows, dim)
        _mpc_lse_fwd_kernel[(triton.cdiv(n_rows, blocks["BLOCK_M"]),)](*args, DOT_PRECISION=precision, **blocks)
    else:
        with launch_device(z.device):
            _mpc_lse_fwd_tuned[lambda m: (triton.cdiv(n_rows, m["BLOCK_M"]),)](*args, DOT_PRECISION=precision)
    return lse


def _lse_backward(z: torch.Tensor, lse: torch.Tensor, grad_lse: torch.Tensor, temperature: float) -> torch.Tensor:
    """d(sum_i grad_lse_i * lse_i)/dz [N, D] float32, recomputing the tiles (Triton)."""
    n_rows, dim = z.shape
    grad_lse = grad_lse.float().contiguous()
    grad_z = torch.empty((n_rows, dim), dtype=torch.float32, device=z.device)
    precision = "ieee" if kernels_interpreted() else "tf32"
    if precision == "tf32":
        z = round_to_tf32(z)
    args = (z, lse, grad_lse, grad_z, n_rows, dim, *z.stride(), *grad_z.stride(),
            LOG2E / temperature, 1.0 / temperature)
    if kernels_interpreted():
        blocks = _interpreter_blocks(n_rows, dim)
        blocks["BLOCK_DOUT"] = blocks["BLOCK_K"]
        grid = (triton.cdiv(n_rows, blocks["BLOCK_M"]), triton.cdiv(dim, blocks["BLOCK_DOUT"]))
        _mpc_lse_bwd_kernel[grid](*args, DOT_PRECISION=precision, ROUND_ASM=_compiled(), **blocks)
    else:
        grid = lambda m: (triton.cdiv(n_rows, m["BLOCK_M"]), triton.cdiv(dim, m["BLOCK_DOUT"]))
        with launch_device(z.device):
            _mpc_lse_bwd_tuned[grid](*args, DOT_PRECISION=precision, ROUND_ASM=_compiled())
    return grad_z


class _OffDiagonalLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, temperature: float):
        z = z.float().contiguous()
        lse = _lse_forward(z, temperature)
        ctx.save_for_backward(z, lse)
        ctx.temperature = temperature
        return lse

    @staticmethod
    def backward(ctx, grad_lse: torch.Tensor):
        z, lse = ctx.saved_tensors
        return _lse_backward(z, lse, grad_lse, ctx.temperature), None


def off_diagonal_logsumexp(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """lse_i = log sum_{a != i} exp(z_i . z_a / temperature) for z [N, D], float32 [N] (Triton).

    Differentiable in z; -inf for a lone row (N = 1). Never forms the N x N matrix.
    """
    if z.dim() != 2:
        raise ValueError(f"off_diagonal_logsumexp expects z [N, D], got {tuple(z.shape)}")
    check_kernel_inputs("off_diagonal_logsumexp", z)
    return _OffDiagonalLogSumExp.apply(z, float(temperature))


# Row chunk for the O(N * D) PyTorch steps: bounds their temporaries to _ROW_CHUNK x D.
_ROW_CHUNK = 8192
_NORM_EPS = 1e-12  # as F.normalize


def _normalise(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z = x / max(||x||, eps) in float32 (one N x D buffer), and the clamped norms."""
    norms = torch.linalg.vector_norm(embeddings, dim=1, dtype=torch.float32).clamp_min(_NORM_EPS)
    z = embeddings.to(torch.float32, copy=True).contiguous()
    z.div_(norms[:, None])
    return z, norms


def _group_sums(z: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """[groups, D]: sum over each group's rows of z (times row_weight), deterministic.

    ``order`` lists the rows group by group (a stable sort of the group index) and ``offsets`` [groups + 1]
    where each group starts in it. Rows are summed in that fixed order, one row chunk at a time
    (``segment_reduce`` adds each segment's rows in sequence; no atomics, unlike ``index_add_`` on CUDA),
    so the result is the same bits on every run.
    """
    n_rows = z.shape[0]
    sums = torch.zeros((offsets.numel() - 1, z.shape[1]), dtype=torch.float32, device=z.device)
    for start in range(0, n_rows, _ROW_CHUNK):
        stop = min(start + _ROW_CHUNK, n_rows)
        rows = order[start:stop]
        block = z[rows] if row_weight is None else z[rows] * row_weight[rows, None]
        # each group's part of this chunk: its [start, stop) offsets, relative to the chunk
        local = offsets.clamp(start, stop) - start
        sums += torch.segment_reduce(block, "sum", offsets=local, axis=0, unsafe=True)
    return sums


class _MPCLoss(torch.autograd.Function):
    """Normalisation, positive term and log-sum-exp in one Function with a hand-written backward,
    so that only the input and O(N) vectors are kept for the backward (z is recomputed).

    loss = sum_i w_i (lse_i - P_i / (t |P(i)|)), with P_i = z_i . (G_g(i) - z_i) and w_i = 1/#valid on
    valid anchors, 0 elsewhere.
    """

    @staticmethod
    def forward(ctx, embeddings, group_index, order, offsets, num_positives, anchor_weight, temperature: float):
        z, norms = _normalise(embeddings)
        lse = _lse_forward(z, temperature)
        sums = _group_sums(z, order, offsets)
        positive = torch.empty_like(lse)
        for start in range(0, z.shape[0], _ROW_CHUNK):
            rows = slice(start, start + _ROW_CHUNK)
            positive[rows] = (z[rows] * (sums[group_index[rows]] - z[rows])).sum(-1)
        per_anchor = lse - positive / (temperature * num_positives.clamp(min=1))
        # where(): excluded anchors (lse may be -inf for N = 1) stay out of the value.
        loss = torch.where(anchor_weight > 0, per_anchor * anchor_weight, torch.zeros_like(per_anchor)).sum()
        ctx.save_for_backward(embeddings, norms, lse, group_index, order, offsets, num_positives, anchor_weight)
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        embeddings, norms, lse, group_index, order, offsets, num_positives, anchor_weight = ctx.saved_tensors
        temperature = ctx.temperature
        z, _ = _normalise(embeddings)
        grad_lse = anchor_weight * grad_loss
        grad_z = _lse_backward(z, lse, grad_lse, temperature)
        # Positive term -sum_i c_i P_i, c_i = grad_lse_i / (t |P(i)|):
        # d/dz_j = -(c_j G_g(j) - 2 c_j z_j + C_g(j)), C_g = sum_{i in g} c_i z_i. (The z_j part is
        # removed again by the normalisation's projection below; kept so grad_z is the true dL/dz.)
        coeff = grad_lse / (temperature * num_positives.clamp(min=1))
        sums = _group_sums(z, order, offsets)
        weighted_sums = _group_sums(z, order, offsets, coeff)
        for start in range(0, z.shape[0], _ROW_CHUNK):
            rows = slice(start, start + _ROW_CHUNK)
            c = coeff[rows, None]
            grad_z[rows] -= c * sums[group_index[rows]] - 2 * c * z[rows] + weighted_sums[group_index[rows]]
        # Through z = x / max(||x||, eps): dx = (dz - z (z . dz)) / ||x||; no projection where clamped.
        radial = (z * grad_z).sum(-1)
        radial = torch.where(norms > _NORM_EPS, radial, torch.zeros_like(radial))
        grad_z.addcmul_(z, radial[:, None], value=-1.0)
        grad_z.div_(norms[:, None])
        return grad_z.to(embeddings.dtype), None, None, None, None, None, None


def mpc_loss(
    embeddings: torch.Tensor,
    groups: torch.Tensor,
    temperature: float = 0.05,
    anchor_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-positive contrastive loss without the N x N matrix (Triton); see the module docstring.

    embeddings [N, D] (float32/float16/bfloat16; L2-normalised inside, with its gradient);
    groups [N] integer ids (equal id = positives of each other; any values); anchor_mask [N] bool.
    Returns a float32 scalar: the mean over anchors with at least one positive, 0 when there are none.
    Keeps only the input and O(N) vectors for the backward.
    """
    temperature = check_mpc_args(embeddings, groups, temperature, anchor_mask)
    n = embeddings.shape[0]
    tensors = (embeddings, groups) + (() if anchor_mask is None else (anchor_mask,))
    check_kernel_inputs("mpc_loss", *tensors)
    if n == 0:
        raise ValueError("mpc_loss got no embeddings (N = 0)")

    _, group_index, group_sizes = torch.unique(groups, return_inverse=True, return_counts=True)
    num_positives = group_sizes[group_index] - 1
    valid = num_positives > 0
    if anchor_mask is not None:
        valid = valid & anchor_mask.to(torch.bool)
    # 1 / #valid on valid anchors: the mean, with no host sync; all zeros when none qualifies.
    anchor_weight = valid.float() / valid.sum().clamp(min=1)
    # rows group by group, and where each group starts: the deterministic group sums' fixed order
    order = torch.argsort(group_index, stable=True)
    offsets = torch.cat((group_sizes.new_zeros(1), group_sizes.cumsum(0)))
    return _MPCLoss.apply(embeddings, group_index, order, offsets, num_positives, anchor_weight, temperature)
