"""What the three Triton kernels share: their mode (compiled or interpreted), the input check, the device
context of a launch, and the reductions and constants their kernels use.

Importing this module imports Triton; ``kernels.dispatch`` imports it only when a call goes to Triton.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

__all__ = ["LOG2E", "kernels_interpreted", "check_kernel_inputs", "launch_device", "row_max", "row_sum"]

# log2(e): the kernels compute exp(x) as exp2(x * log2(e)).
LOG2E = 1.0 / math.log(2.0)


# Triton's own helpers (tl.zeros, tl.max, tl.sum, ...) are @triton.jit functions that become compiled
# or interpreted when triton.language is first imported. Something (torch._dynamo, streaming) often
# imports triton before TRITON_INTERPRET=1 can be set, and an interpreted kernel cannot call a
# compiled helper. So the kernels use builtins only: tl.full, and tl.reduce with the library's
# combine functions, which the interpreter maps straight to numpy.
@triton.jit
def row_max(x):
    """Maximum over axis 1 of a 2-D block."""
    return tl.reduce(x, 1, tl.standard._elementwise_max)


@triton.jit
def row_sum(x):
    """Sum over axis 1 of a 2-D block."""
    return tl.reduce(x, 1, tl.standard._sum_combine)


def kernels_interpreted() -> bool:
    """Whether the kernels were built for the CPU interpreter (``TRITON_INTERPRET=1`` when this module was
    imported). Triton decides this when a kernel is decorated, not when it is launched; every kernel calls
    this module's ``row_max``/``row_sum``, and an interpreted kernel cannot call a compiled helper (nor the
    reverse), so the kernel modules share this module's mode (tests re-import them together)."""
    return not isinstance(row_max, triton.runtime.JITFunction)


def check_kernel_inputs(name: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error for inputs the Triton kernels cannot take (device, dtype)."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{name}: all inputs must be on one device, got {sorted(map(str, devices))}")
    device = tensors[0].device
    if device.type == "cuda":
        if kernels_interpreted():
            raise RuntimeError(
                f"{name}: the Triton kernels were imported with TRITON_INTERPRET=1 (CPU interpreter) "
                "but got CUDA tensors; unset TRITON_INTERPRET for GPU runs"
            )
    elif not kernels_interpreted():
        raise RuntimeError(
            f"{name}: the Triton kernels need CUDA tensors, got {device}. Use the PyTorch reference "
            "(kernels backend 'reference' or 'auto'), or set TRITON_INTERPRET=1 before importing "
            "kernels to run them in Triton's CPU interpreter"
        )
    for t in tensors:
        if t.is_floating_point() and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(
                f"{name}: the Triton kernels take float32/float16/bfloat16 (they compute in fp32), "
                f"got {t.dtype}; use the reference backend for {t.dtype}"
            )


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context of a compiled launch on ``device``: ``torch.cuda.device`` for a GPU (the launch goes to
    that GPU's current stream), nothing for any other device (the CPU tensors of the
    interpreter; the meta tensors whose launches the compile report records instead of running)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
