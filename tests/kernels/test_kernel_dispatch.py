"""kernels.dispatch: which implementation runs, and the precedence env var > set_backend > auto."""

from __future__ import annotations

import typing
from types import SimpleNamespace

import pytest
import torch

import kernels.mpc_loss
import kernels.rope
import kernels.rotary_attention
from kernels import dispatch, reference


@pytest.fixture
def spies(monkeypatch):
    """Replace both implementations with recorders so a test sees which one dispatch called."""
    calls = []
    for module, name in ((kernels.rope, "apply_rotary"), (kernels.rotary_attention, "rotary_attention"),
                         (kernels.mpc_loss, "mpc_loss")):
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: calls.append(("triton", _n)))
        monkeypatch.setattr(reference, name, lambda *a, _n=name, **k: calls.append(("reference", _n)))
    return calls


def _call_all():
    x = torch.randn(1, 5, 2, 32)
    cos, sin = reference.rotary_tables(5, 32)
    dispatch.apply_rotary(x, cos, sin)
    dispatch.rotary_attention(x, x, x, cos, sin)
    dispatch.mpc_loss(torch.randn(4, 8), torch.tensor([0, 0, 1, 1]))


def test_auto_uses_the_reference_for_cpu_tensors(spies):
    assert dispatch.get_backend() == "auto"
    _call_all()
    assert spies == [("reference", "apply_rotary"), ("reference", "rotary_attention"), ("reference", "mpc_loss")]


def test_auto_picks_triton_for_cuda_tensors_except_float64():
    cuda32 = SimpleNamespace(is_cuda=True, dtype=torch.float32)
    cuda_bf16 = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    cuda64 = SimpleNamespace(is_cuda=True, dtype=torch.float64)
    cpu32 = SimpleNamespace(is_cuda=False, dtype=torch.float32)
    assert dispatch.use_triton(cuda32) and dispatch.use_triton(cuda_bf16)
    assert not dispatch.use_triton(cuda64)
    assert not dispatch.use_triton(cuda32, cpu32)


def test_set_backend_triton_runs_the_kernels_under_the_interpreter(spies):
    dispatch.set_backend("triton")
    _call_all()
    assert [c[0] for c in spies] == ["triton"] * 3


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    dispatch.set_backend("triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*model.kernels=reference"):
        dispatch.apply_rotary(torch.randn(1, 5, 2, 32), *reference.rotary_tables(5, 32))


def test_environment_variable_overrides_the_recipe(spies, monkeypatch):
    dispatch.set_backend("triton")
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.get_backend() == "reference"
    _call_all()
    assert [c[0] for c in spies] == ["reference"] * 3
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    dispatch.set_backend("reference")
    assert dispatch.get_backend() == "triton"


def test_unknown_backends_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown kernels backend 'cuda'"):
        dispatch.set_backend("cuda")
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="AF_KERNELS='fast'"):
        dispatch.get_backend()


def test_recipe_choices_are_the_dispatch_backends():
    from af_train.config import ModelConfig

    choices = typing.get_args(typing.get_type_hints(ModelConfig)["kernels"])
    assert set(choices) == set(dispatch.BACKENDS)


def test_dispatched_triton_and_reference_agree_end_to_end():
    # Real kernels through dispatch (no spies): same numbers either way.
    q, k, v = (torch.randn(2, 9, 2, 32) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    cos, sin = reference.rotary_tables(9, 32)
    embeddings, groups = torch.randn(12, 16), torch.arange(6).repeat(2)
    results = {}
    for backend in ("reference", "triton"):
        dispatch.set_backend(backend)
        results[backend] = (
            dispatch.apply_rotary(q, cos, sin, False),
            dispatch.rotary_attention(q, k, v, cos, sin, mask),
            dispatch.mpc_loss(embeddings, groups, 0.1),
        )
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
