"""Fused rotary position embedding (RoPE): Triton kernel, autograd Function, user-facing functions.

``apply_rotary(x, cos, sin, interleaved=True)`` rotates x [batch, seq, heads, head_dim] by the
angles in cos/sin [seq, head_dim // 2], as ``kernels.reference.apply_rotary`` does. The kernel
reads x through its strides (BSHD, or a BHSD-contiguous tensor viewed as BSHD: no copy), loads
cos/sin once per (position, head block) for several heads, computes in fp32 and writes the input
dtype. The backward is the rotation by -theta, the same kernel with the sine negated.
``apply_rotary_(x, ...)`` is the in-place variant.

On CUDA the launch configuration is autotuned; under ``TRITON_INTERPRET=1`` (CPU tests) one fixed
configuration is used, because the interpreter runs every candidate slowly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import check_rotary_shapes
from kernels.utils import check_kernel_inputs, kernels_interpreted, launch_device

__all__ = ["apply_rotary", "apply_rotary_"]


@triton.jit
def _rotary_kernel(
    x_ptr,
    out_ptr,
    cos_ptr,
    sin_ptr,
    seq_len,
    n_heads,
    half_dim,
    stride_xb,
    stride_xs,
    stride_xh,
    stride_xd,
    stride_ob,
    stride_os,
    stride_oh,
    stride_od,
    stride_cs,
    stride_cd,
    stride_ss,
    stride_sd,
    INTERLEAVED: tl.constexpr,
    CONJUGATE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # One program: BLOCK_S positions x BLOCK_H heads of one batch row; cos/sin loaded once per
    # position and broadcast over the heads.
    pid_s = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, BLOCK_HALF)

    table_mask = (offs_s[:, None] < seq_len) & (offs_i[None, :] < half_dim)
    cos = tl.load(
        cos_ptr + offs_s[:, None] * stride_cs + offs_i[None, :] * stride_cd, mask=table_mask, other=0.0
    ).to(tl.float32)
    sin = tl.load(
        sin_ptr + offs_s[:, None] * stride_ss + offs_i[None, :] * stride_sd, mask=table_mask, other=0.0
    ).to(tl.float32)
    if CONJUGATE:
        sin = -sin
    cos = cos[:, None, :]
    sin = sin[:, None, :]

    if INTERLEAVED:
        first = 2 * offs_i
        second = 2 * offs_i + 1
    else:
        first = offs_i
        second = offs_i + half_dim
    mask = (
        (offs_s[:, None, None] < seq_len)
        & (offs_h[None, :, None] < n_heads)
        & (offs_i[None, None, :] < half_dim)
    )
    x_base = x_ptr + pid_b * stride_xb + offs_s[:, None, None] * stride_xs + offs_h[None, :, None] * stride_xh
    x1 = tl.load(x_base + first[None, None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + second[None, None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    o_base = out_ptr + pid_b * stride_ob + offs_s[:, None, None] * stride_os + offs_h[None, :, None] * stride_oh
    tl.store(o_base + first[None, None, :] * stride_od, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_base + second[None, None, :] * stride_od, y2.to(out_ptr.dtype.element_ty), mask=mask)


def _gpu_configs() -> list[triton.Config]:
    # H100: the kernel is bandwidth bound; more positions per program amortise the table loads
    # and give each program enough bytes in flight. A short list keeps the first call's tuning cheap.
    pairs = ((1, 2), (2, 2), (2, 4), (4, 4), (4, 8), (8, 4), (8, 8), (16, 8))
    return [triton.Config({"BLOCK_S": block_s}, num_warps=warps) for block_s, warps in pairs]


# restore_value: the in-place variant writes into x, so every autotuning trial must start from
# the original values.
_rotary_kernel_tuned = triton.autotune(
    configs=_gpu_configs(),
    key=["n_heads", "half_dim", "INTERLEAVED", "CONJUGATE"],
    restore_value=["out_ptr"],
)(_rotary_kernel)


def _launch(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            interleaved: bool, conjugate: bool) -> None:
    batch, seq, heads, head_dim = x.shape
    if x.numel() == 0:
        return
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(heads), max(1, 4096 // block_half))
    args = (
        x, out, cos, sin, seq, heads, half,
        *x.stride(), *out.stride(), *cos.stride(), *sin.stride(),
    )
    if kernels_interpreted():
        block_s = min(triton.next_power_of_2(seq), 16)
        grid = (triton.cdiv(seq, block_s), triton.cdiv(heads, block_h), batch)
        _rotary_kernel[grid](
            *args, INTERLEAVED=interleaved, CONJUGATE=conjugate,
            BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_HALF=block_half,
        )
        return
    grid = lambda meta: (triton.cdiv(seq, meta["BLOCK_S"]), triton.cdiv(heads, block_h), batch)
    with launch_device(x.device):
        _rotary_kernel_tuned[grid](
            *args, INTERLEAVED=interleaved, CONJUGATE=conjugate, BLOCK_H=block_h, BLOCK_HALF=block_half,
        )


def _table_grads(
    grad_out: torch.Tensor, x: torch.Tensor, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """d loss / d cos and d sin, summed over batch and heads (rarely needed: tables are buffers)."""
    g = grad_out.float()
    xf = x.float()
    half = x.shape[-1] // 2
    if interleaved:
        g1, g2, x1, x2 = g[..., 0::2], g[..., 1::2], xf[..., 0::2], xf[..., 1::2]
    else:
        g1, g2, x1, x2 = g[..., :half], g[..., half:], xf[..., :half], xf[..., half:]
    grad_cos = (g1 * x1 + g2 * x2).sum(dim=(0, 2))
    grad_sin = (g2 * x1 - g1 * x2).sum(dim=(0, 2))
    return grad_cos, grad_sin


class _ApplyRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, interleaved: bool, inplace: bool):
        out = x if inplace else torch.empty_like(x)
        tables_need_grad = cos.requires_grad or sin.requires_grad
        if inplace and tables_need_grad:
            raise ValueError(
                "apply_rotary_ (in place) cannot give gradients for cos/sin: it overwrites x; "
                "use apply_rotary or detach the tables"
            )
        _launch(x, out, cos, sin, interleaved, conjugate=False)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin, x if tables_need_grad else None)
        ctx.interleaved = interleaved
        return out

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin, x = ctx.saved_tensors
        grad_x = grad_cos = grad_sin = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(grad_out)
            _launch(grad_out, grad_x, cos, sin, ctx.interleaved, conjugate=True)
        if x is not None and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            grad_cos, grad_sin = _table_grads(grad_out, x, ctx.interleaved)
            grad_cos, grad_sin = grad_cos.to(cos.dtype), grad_sin.to(sin.dtype)
        return grad_x, grad_cos, grad_sin, None, None


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True
) -> torch.Tensor:
    """Rotate x [batch, seq, heads, head_dim] by cos/sin [seq, head_dim // 2] (Triton).

    ``interleaved=True`` rotates pairs (x[2i], x[2i+1]) as RoFormer does; ``False`` rotates halves
    (x[i], x[i + d/2]) as LLaMA does. Any strides; the output has x's dtype and memory layout.
    """
    check_rotary_shapes(x, cos, sin)
    check_kernel_inputs("apply_rotary", x, cos, sin)
    return _ApplyRotary.apply(x, cos, sin, interleaved, False)


def apply_rotary_(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True
) -> torch.Tensor:
    """In-place :func:`apply_rotary`: rotates x's memory and returns x (autograd-aware)."""
    check_rotary_shapes(x, cos, sin)
    check_kernel_inputs("apply_rotary_", x, cos, sin)
    return _ApplyRotary.apply(x, cos, sin, interleaved, True)
