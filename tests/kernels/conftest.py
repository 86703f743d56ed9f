"""Run the Triton kernels in Triton's CPU interpreter, without leaking that into other test dirs.

Triton decides interpreter vs compiled when a kernel is decorated (at import of the kernel module),
reading TRITON_INTERPRET then. So the kernel modules are imported (or re-imported, if something
imported them compiled) with TRITON_INTERPRET=1 here, and the variable is restored right after;
each test in this directory sees TRITON_INTERPRET=1 again through a fixture (kernels.dispatch
reads it to allow the 'triton' backend on CPU tensors).
"""

from __future__ import annotations

import os

import pytest
from kernel_modules import import_kernel_modules

import_kernel_modules(interpret=True)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def seeded():
    """A fresh generator per test (seeded from the test's name so failures reproduce)."""
    import zlib

    import torch

    name = os.environ.get("PYTEST_CURRENT_TEST", "kernels")
    torch.manual_seed(zlib.crc32(name.split(" ")[0].encode()))
