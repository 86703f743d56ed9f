"""The CUDA tests run the compiled kernels. tests/kernels imports the kernel modules in Triton's
interpreter (TRITON_INTERPRET=1 when they are decorated); if that happened in this session, they are
re-imported compiled for these tests and put back in interpreter mode afterwards."""

from __future__ import annotations

import sys

import pytest
from kernel_modules import KERNEL_MODULES, import_kernel_modules


@pytest.fixture(scope="session")
def compiled_kernels():
    """The kernel modules, compiled (only requested by tests that have a GPU: the cuda marker)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    utils = sys.modules.get("kernels.utils")
    was_interpreted = utils is not None and utils.kernels_interpreted()
    if was_interpreted or utils is None:
        import_kernel_modules(interpret=False)
    yield {name.split(".")[1]: sys.modules[name] for name in KERNEL_MODULES}
    if was_interpreted:
        import_kernel_modules(interpret=True)
