"""The CUDA tests run the compiled kernels. tests/kernels imports the kernel modules in Triton's
interpreter (TRITON_INTERPRET=1 when they are decorated); if that happened in this session, they are
re-imported compiled for these tests and put back in interpreter mode afterwards."""

from __future__ import annotations

import importlib
import os
import sys

import pytest

KERNEL_MODULES = ("kernels.rope", "kernels.rotary_attention", "kernels.mpc_loss")


def _reimport(interpret: bool) -> None:
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        for name in KERNEL_MODULES:
            module = sys.modules.get(name)
            if module is None:
                importlib.import_module(name)
            else:
                importlib.reload(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


@pytest.fixture(scope="session")
def compiled_kernels():
    """The kernel modules, compiled (only requested by tests that have a GPU: the cuda marker)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rope = sys.modules.get("kernels.rope")
    was_interpreted = rope is not None and rope.kernels_interpreted()
    if was_interpreted or rope is None:
        _reimport(interpret=False)
    yield {name.split(".")[1]: sys.modules[name] for name in KERNEL_MODULES}
    if was_interpreted:
        _reimport(interpret=True)
