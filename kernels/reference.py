"""Pure-PyTorch twins of the Triton kernels, with the same signatures (docs/ARCHITECTURE.md, "Kernel formulas").

These are the semantics the kernels must reproduce, and the path used on CPU. They compute in
float32 (or float64 when given float64) and return the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["rotary_tables", "apply_rotary", "rotary_attention", "dropout_drop_mask", "mpc_loss", "check_mpc_args"]


def rotary_tables(
    seq_len: int,
    head_dim: int,
    base: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape [seq_len, head_dim // 2] (RoFormer's sinusoidal positions).

    Angle for position t and pair i is t * base ** (-2i / head_dim), as Hugging Face's
    ``RoFormerSinusoidalPositionalEmbedding`` computes it.
    """
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def check_rotary_shapes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Raise a clear error unless x is [batch, seq, heads, even head_dim] and cos/sin [seq, head_dim // 2]."""
    if x.dim() != 4:
        raise ValueError(f"apply_rotary expects x of shape [batch, seq, heads, head_dim], got {tuple(x.shape)}")
    seq, head_dim = x.shape[1], x.shape[3]
    if head_dim % 2:
        raise ValueError(f"apply_rotary needs an even head_dim, got {head_dim}")
    want = (seq, head_dim // 2)
    if tuple(cos.shape) != want or tuple(sin.shape) != want:
        raise ValueError(
            f"cos/sin must have shape [seq, head_dim // 2] = {list(want)}, "
            f"got cos {list(cos.shape)} and sin {list(sin.shape)}"
        )


def check_attention_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None, dropout_p: float
) -> float:
    """Raise a clear error unless q, k, v share a shape, the mask is [batch, seq] and 0 <= dropout_p < 1;
    returns dropout_p as a float."""
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, seq = q.shape[0], q.shape[1]
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, seq):
        raise ValueError(f"attention_mask must be [batch, seq] = {[batch, seq]}, got {list(attention_mask.shape)}")
    return check_dropout_p("rotary_attention", dropout_p)


def check_dropout_p(name: str, dropout_p: float) -> float:
    """``dropout_p`` as a float; a clear error unless it is in [0, 1)."""
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}: dropout_p must be in [0, 1), got {dropout_p}")
    return dropout_p


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True
) -> torch.Tensor:
    """Rotate x [batch, seq, heads, head_dim] by the angles in cos/sin [seq, head_dim // 2].

    ``interleaved=True`` rotates pairs (x[2i], x[2i+1]) as RoFormer does; ``False`` rotates halves
    (x[i], x[i + d/2]) as LLaMA does.
    """
    check_rotary_shapes(x, cos, sin)
    return _rotate(x, cos[None, :, None, :], sin[None, :, None, :], interleaved)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """``x [..., head_dim]`` rotated by cos/sin that broadcast against ``x[..., :head_dim // 2]``, in
    float32 (float64 for float64 input). The result is contiguous in x's logical shape whatever x's
    strides: the final stack/cat writes it, so a transposed view comes out as its own layout, uncopied."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(compute)
    c = cos.to(compute)
    s = sin.to(compute)
    if interleaved:
        x1, x2 = xc[..., 0::2], xc[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        x1, x2 = xc[..., :half], xc[..., half:]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out.to(x.dtype)


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
    """Non-causal attention with RoPE applied to q and k. q, k, v: [batch, seq, heads, head_dim].

    ``attention_mask`` [batch, seq]: 1 for real tokens, 0 for padding (keys that are never attended).
    A sequence with no real token at all gets a zero output (no NaN).
    ``dropout_p`` in [0, 1): dropout on the attention probabilities, applied whenever > 0 (the caller
    passes 0 in eval mode), drawn from torch's default generator: by SDPA itself, or on CPU in fp32/fp64
    by ``_EagerDropoutAttention`` (SDPA has no fused CPU kernel with dropout). The masks differ from the
    Triton kernel's (another generator); the distribution is the same.
    Uses ``scaled_dot_product_attention`` otherwise: no eager T x T softmax on the default path.
    """
    dropout_p = check_attention_args(q, k, v, attention_mask, dropout_p)
    check_rotary_shapes(q, cos, sin)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    eager = dropout_p > 0.0 and _eager_dropout_attention_applies(q)
    # Rotated straight into [batch, heads, seq, head_dim]; the eager path folds the softmax scale into
    # q's tables (seq x head_dim / 2 numbers) instead of a pass over the T x T scores.
    q_tables_scale = scale if eager else 1.0
    qr = _rotate(q.transpose(1, 2), cos * q_tables_scale, sin * q_tables_scale, interleaved)
    kr = _rotate(k.transpose(1, 2), cos, sin, interleaved)
    vt = v.transpose(1, 2)
    mask = empty = None
    if attention_mask is not None:
        keep = attention_mask.to(torch.bool)
        # A batch without padding needs no mask: SDPA then takes its fused path instead of building and
        # applying a boolean [B, 1, 1, T] mask (about 10 % of a CPU forward at 752 tokens).
        if not bool(keep.all()):
            empty = ~keep.any(dim=1)
            # SDPA returns NaN for a query whose keys are all masked; let empty sequences attend to
            # everything and zero their output afterwards instead.
            keep = keep | empty[:, None]
            mask = keep[:, None, None, :]
    if eager:
        out = _EagerDropoutAttention.apply(qr, kr, vt, mask, dropout_p)
    else:
        out = F.scaled_dot_product_attention(qr, kr, vt, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    out = out.transpose(1, 2)
    if empty is not None:
        out = out * (~empty).to(out.dtype)[:, None, None, None]
    return out


def dropout_drop_mask(
    shape: torch.Size | tuple[int, ...], dropout_p: float, device: torch.device | str
) -> torch.Tensor:
    """A bool tensor of ``shape``, True where an element is dropped, each independently with
    probability ``dropout_p`` (to within 2**-31), from torch's default generator.

    One 31-bit integer per element compared with a threshold: about 3x cheaper on CPU than
    ``bernoulli_`` (which draws a double per element without MKL's vector path).
    """
    draws = torch.empty(shape, dtype=torch.int32, device=device).random_()  # uniform on [0, 2**31)
    return draws < int(round(float(dropout_p) * 2**31))


def _eager_dropout_attention_applies(q: torch.Tensor) -> bool:
    """SDPA falls back to its unfused maths kernel on CPU whenever dropout is on; ours is cheaper there.
    Low precision stays with SDPA (its maths kernel upcasts where ours would not)."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)


class _EagerDropoutAttention(torch.autograd.Function):
    """``Dropout(softmax(q k^T + mask)) v`` for [batch, heads, seq, head_dim] inputs, q already scaled,
    with a hand-written backward. Against SDPA's CPU maths path with dropout it skips the scale pass
    over the T x T scores (folded into q's rotary tables), the -inf row checks of its safe softmax and
    the 1 / (1 - p) pass over the probabilities (folded into the small output and its gradient), draws
    a cheaper mask (``dropout_drop_mask``) and copies no transposed operand twice. Saved for backward:
    the probabilities, the dropped probabilities and the bool mask (9 bytes per score).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_keep: torch.Tensor | None,
                dropout_p: float) -> torch.Tensor:
        v = v.contiguous()  # used twice as a matmul operand
        scores = torch.matmul(q, k.transpose(-2, -1))
        if key_keep is not None:
            scores.masked_fill_(~key_keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        del scores
        dropped_mask = dropout_drop_mask(probs.shape, dropout_p, probs.device)
        dropped = probs.masked_fill(dropped_mask, 0.0)
        keep_scale = 1.0 / (1.0 - dropout_p)
        out = torch.matmul(dropped, v).mul_(keep_scale)
        ctx.save_for_backward(q, k, v, probs, dropped, dropped_mask)
        ctx.keep_scale = keep_scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, probs, dropped, dropped_mask = ctx.saved_tensors
        # one pass that scales and makes the (transposed-view) gradient contiguous for both matmuls
        scaled = torch.empty(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device)
        torch.mul(grad_out, ctx.keep_scale, out=scaled)
        grad_v = torch.matmul(dropped.transpose(-2, -1), scaled)
        grad_probs = torch.matmul(scaled, v.transpose(-2, -1)).masked_fill_(dropped_mask, 0.0)
        grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        del grad_probs
        grad_q = torch.matmul(grad_scores, k)
        grad_k = torch.matmul(grad_scores.transpose(-2, -1), q)
        return grad_q, grad_k, grad_v, None, None


def check_mpc_args(
    embeddings: torch.Tensor, groups: torch.Tensor, temperature: float, anchor_mask: torch.Tensor | None
) -> float:
    """Raise a clear error unless embeddings is [N, D], groups [N] integer ids, anchor_mask [N] and
    temperature a finite number > 0 (NaN included in the refusal); returns temperature as a float."""
    if embeddings.dim() != 2:
        raise ValueError(f"mpc_loss expects embeddings [N, D], got {tuple(embeddings.shape)}")
    n = embeddings.shape[0]
    if groups.shape != (n,):
        raise ValueError(f"groups must be [N] = [{n}], got {list(groups.shape)}")
    if groups.is_floating_point() or groups.is_complex():
        raise TypeError(f"groups must hold integer ids, got {groups.dtype}")
    if anchor_mask is not None and anchor_mask.shape != (n,):
        raise ValueError(f"anchor_mask must be [N] = [{n}], got {list(anchor_mask.shape)}")
    temperature = float(temperature)
    if not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be > 0 and finite, got {temperature}")
    return temperature


def mpc_loss(
    embeddings: torch.Tensor,
    groups: torch.Tensor,
    temperature: float = 0.05,
    anchor_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-positive contrastive loss (docs/ARCHITECTURE.md, "Kernel formulas"). Materialises the N x N
    similarity matrix.

    For anchor i with positives P(i) = {p != i : groups[p] = groups[i]}:
    loss_i = -(1/|P(i)|) sum_p log(exp(s_ip / t) / sum_{a != i} exp(s_ia / t)), s = cosine similarity.
    Returns the mean over anchors with at least one positive (0 when there is none).
    """
    check_mpc_args(embeddings, groups, temperature, anchor_mask)
    n = embeddings.shape[0]
    compute = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    z = F.normalize(embeddings.to(compute), dim=-1)
    logits = (z @ z.t()) / temperature
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    log_denominator = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1)
    positives = (groups[:, None] == groups[None, :]) & ~eye
    num_pos = positives.sum(dim=1)
    pos_sum = (logits * positives).sum(dim=1)
    valid = num_pos > 0
    if anchor_mask is not None:
        valid = valid & anchor_mask.to(torch.bool)
    per_anchor = log_denominator - pos_sum / num_pos.clamp(min=1)
    if not bool(valid.any()):
        return (logits.sum() * 0.0).to(compute)
    return per_anchor[valid].mean()
