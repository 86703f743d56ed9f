"""Run the Triton kernels in Triton's CPU interpreter, without leaking that into other test dirs.

Triton decides interpreter vs compiled when a kernel is decorated (at import of the kernel module),
reading TRITON_INTERPRET then. So the kernel modules are imported (or re-imported, if something
imported them compiled) with TRITON_INTERPRET=1 here, and the variable is restored right after;
each test in this directory sees TRITON_INTERPRET=1 again through a fixture (kernels.dispatch
reads it to allow the 'triton' backend on CPU tensors).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest

KERNEL_MODULES = ("kernels.rope", "kernels.rotary_attention", "kernels.mpc_loss")


def _import_kernels_interpreted() -> None:
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        rope = sys.modules.get("kernels.rope")
        reload = rope is not None and not rope.kernels_interpreted()
        for name in KERNEL_MODULES:
            module = sys.modules.get(name)
            if module is not None and reload:
                importlib.reload(module)
            else:
                importlib.import_module(name)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_import_kernels_interpreted()


@pytest.fixture(autouse=True)
def _interpreter_and_default_backend(monkeypatch):
    from kernels import dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.set_backend("auto")
    yield
    dispatch.set_backend("auto")


@pytest.fixture
def seeded():
    """A fresh generator per test (seeded from the test's name so failures reproduce)."""
    import zlib

    import torch

    name = os.environ.get("PYTEST_CURRENT_TEST", "kernels")
    torch.manual_seed(zlib.crc32(name.split(" ")[0].encode()))
