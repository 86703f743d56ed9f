"""The one place that decides between the Triton kernels and their PyTorch references.

Callers pass the backend explicitly (``backend=``; the model holds the recipe's ``model.kernels``):
``reference``; ``triton``, which forces the kernels and raises a clear error for what they cannot take; or
``auto`` (the default): Triton for CUDA tensors, the reference otherwise. float64 always takes the
reference under ``auto`` (the kernels compute in fp32). Attention in fp32 on a GPU takes the reference
(PyTorch's SDPA) under ``auto`` and ``triton`` alike (see :func:`use_triton_attention`).

Nothing here reads the environment on a call. The ``AF_KERNELS`` variable (for debugging) is read once by
the entry points (af-train, af-evaluate, af-predict, af-embed) through :func:`backend_from_environment`
and passed down as the kernels choice, like the recipe key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

import torch

from kernels import reference

Backend = Literal["auto", "triton", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "reference")
ENV_VAR = "AF_KERNELS"


def check_backend(name: str) -> str:
    """``name`` if it is a backend, else a ValueError listing them."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend '{name}'; choose one of {', '.join(BACKENDS)}")
    return name


def backend_from_environment(environ: Mapping[str, str]) -> str | None:
    """The backend ``AF_KERNELS`` names in ``environ`` (None when unset or empty), for an entry point to read
    once and pass down; a ValueError naming the variable when it names no backend."""
    value = environ.get(ENV_VAR)
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a kernels backend; use one of {', '.join(BACKENDS)}")
    return value


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor, backend: str = "auto") -> bool:
    """Whether a call on these tensors goes to Triton under ``backend``."""
    backend = check_backend(backend)
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


def use_triton_attention(q: torch.Tensor, backend: str = "auto") -> bool:
    """Whether rotary attention on ``q`` goes to Triton: as :func:`use_triton`, except fp32 on a GPU, which
    takes the reference (PyTorch's SDPA) under ``triton`` too. Triton's exact fp32 dots are scalar FMAs (no
    tensor cores) and the backward spills; SDPA is faster there, with the same semantics (its dropout mask
    comes from SDPA). In the CPU interpreter fp32 goes to the kernel (that is how it is tested)."""
    return use_triton(q, backend=backend) and not (q.is_cuda and q.dtype == torch.float32)


def apply_rotary(x, cos, sin, interleaved: bool = True, *, backend: str = "auto") -> torch.Tensor:
    """RoPE on x [batch, seq, heads, head_dim]; see ``kernels.rope.apply_rotary``."""
    if use_triton(x, backend=backend):
        from kernels.rope import apply_rotary as triton_apply_rotary

        return triton_apply_rotary(x, cos, sin, interleaved)
    return reference.apply_rotary(x, cos, sin, interleaved)


def rotary_attention(
    q, k, v, cos, sin, attention_mask=None, interleaved: bool = True, softmax_scale: float | None = None,
    dropout_p: float = 0.0, *, backend: str = "auto",
) -> torch.Tensor:
    """Non-causal attention with RoPE on q, k and optional dropout (``dropout_p``) on the attention
    probabilities; see ``kernels.rotary_attention.rotary_attention``."""
    if use_triton_attention(q, backend=backend):
        from kernels.rotary_attention import rotary_attention as triton_rotary_attention

        return triton_rotary_attention(q, k, v, cos, sin, attention_mask, interleaved, softmax_scale, dropout_p)
    return reference.rotary_attention(q, k, v, cos, sin, attention_mask, interleaved, softmax_scale, dropout_p)


def mpc_loss(embeddings, groups, temperature: float = 0.05, anchor_mask=None, *,
             backend: str = "auto") -> torch.Tensor:
    """Multi-positive contrastive loss; see ``kernels.mpc_loss.mpc_loss``."""
    if use_triton(embeddings, backend=backend):
        from kernels.mpc_loss import mpc_loss as triton_mpc_loss

        return triton_mpc_loss(embeddings, groups, temperature, anchor_mask)
    return reference.mpc_loss(embeddings, groups, temperature, anchor_mask)
