"""The one place that decides between the Triton kernels and their PyTorch references.

Callers pass the backend explicitly (``backend=``; the model holds the recipe's ``model.kernels``).
Order of precedence: the ``AF_KERNELS`` environment variable (for debugging), then the ``backend``
argument, then the default of :func:`set_backend` (kept for tests), then ``auto``: Triton for CUDA
tensors, the reference otherwise. float64 always takes the reference under ``auto`` (the kernels
compute in fp32); ``triton`` forces the kernels and raises a clear error for what they cannot take.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from kernels import reference

Backend = Literal["auto", "triton", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "reference")
ENV_VAR = "AF_KERNELS"

_backend: str = "auto"


def check_backend(name: str) -> str:
    """``name`` if it is a backend, else a ValueError listing them."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend '{name}'; choose one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Default for calls that pass no ``backend`` (tests); af_train passes it explicitly."""
    global _backend
    _backend = check_backend(name)


def get_backend(backend: str | None = None) -> str:
    """The backend in force: the environment variable, else ``backend``, else :func:`set_backend`'s."""
    env = os.environ.get(ENV_VAR)
    if env:
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={env!r} is not a kernels backend; use one of {', '.join(BACKENDS)}")
        return env
    return check_backend(backend) if backend is not None else _backend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor, backend: str | None = None) -> bool:
    """Whether a call on these tensors goes to Triton under ``backend`` (see :func:`get_backend`)."""
    backend = get_backend(backend)
    if backend == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "triton":
        if not (on_cuda or _interpreting()):
            raise RuntimeError(
                "kernels backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                "interpreter); set model.kernels=reference or auto for CPU runs"
            )
        return True
    return on_cuda and not any(t.dtype == torch.float64 for t in tensors)


def apply_rotary(x, cos, sin, interleaved: bool = True, *, backend: str | None = None) -> torch.Tensor:
    """RoPE on x [batch, seq, heads, head_dim]; see ``kernels.rope.apply_rotary``."""
    if use_triton(x, backend=backend):
        from kernels.rope import apply_rotary as triton_apply_rotary

        return triton_apply_rotary(x, cos, sin, interleaved)
    return reference.apply_rotary(x, cos, sin, interleaved)


def rotary_attention(
    q, k, v, cos, sin, attention_mask=None, interleaved: bool = True, softmax_scale: float | None = None,
    dropout_p: float = 0.0, *, backend: str | None = None,
) -> torch.Tensor:
    """Non-causal attention with RoPE on q, k and optional dropout (``dropout_p``) on the attention
    probabilities; see ``kernels.rotary_attention.rotary_attention``."""
    if use_triton(q, backend=backend):
        from kernels.rotary_attention import rotary_attention as triton_rotary_attention

        return triton_rotary_attention(q, k, v, cos, sin, attention_mask, interleaved, softmax_scale, dropout_p)
    return reference.rotary_attention(q, k, v, cos, sin, attention_mask, interleaved, softmax_scale, dropout_p)


def mpc_loss(embeddings, groups, temperature: float = 0.05, anchor_mask=None, *,
             backend: str | None = None) -> torch.Tensor:
    """Multi-positive contrastive loss; see ``kernels.mpc_loss.mpc_loss``."""
    if use_triton(embeddings, backend=backend):
        from kernels.mpc_loss import mpc_loss as triton_mpc_loss

        return triton_mpc_loss(embeddings, groups, temperature, anchor_mask)
    return reference.mpc_loss(embeddings, groups, temperature, anchor_mask)
