"""Import the Triton kernel modules interpreted or compiled: tests/kernels runs them in Triton's CPU
interpreter, tests/kernels_cuda compiled, and either may run first in a session.

Triton decides interpreter vs compiled when a kernel is decorated (at import of the kernel module),
reading TRITON_INTERPRET then; so switching means re-importing the kernel modules (kernels.utils first:
its helpers are called by every kernel, and ``kernels_interpreted`` reads its mode), with the variable set
only for the import.
"""

from __future__ import annotations

import importlib
import os
import sys

KERNEL_MODULES = ("kernels.utils", "kernels.rope", "kernels.rotary_attention", "kernels.mpc_loss")


def import_kernel_modules(interpret: bool) -> None:
    """Make the kernel modules interpreted (``interpret=True``) or compiled, importing or re-importing
    them as needed; TRITON_INTERPRET is restored afterwards."""
    utils = sys.modules.get("kernels.utils")
    switch = utils is not None and utils.kernels_interpreted() != interpret
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        for name in KERNEL_MODULES:
            module = sys.modules.get(name)
            if module is not None and switch:
                importlib.reload(module)
            else:
                importlib.import_module(name)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
