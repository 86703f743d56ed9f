"""kernels.dispatch: which implementation runs for each backend, and AF_KERNELS read once by the entry points
(never by dispatch on a call)."""

from __future__ import annotations

import argparse
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


def _call_all(**backend):
    x = torch.randn(1, 5, 2, 32)
    cos, sin = reference.rotary_tables(5, 32)
    dispatch.apply_rotary(x, cos, sin, **backend)
    dispatch.rotary_attention(x, x, x, cos, sin, **backend)
    dispatch.mpc_loss(torch.randn(4, 8), torch.tensor([0, 0, 1, 1]), **backend)


def test_auto_uses_the_reference_for_cpu_tensors(spies):
    _call_all()  # the default backend
    _call_all(backend="auto")
    assert spies == [("reference", "apply_rotary"), ("reference", "rotary_attention"), ("reference", "mpc_loss")] * 2


def test_auto_picks_triton_for_cuda_tensors_except_float64():
    cuda32 = SimpleNamespace(is_cuda=True, dtype=torch.float32)
    cuda_bf16 = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    cuda64 = SimpleNamespace(is_cuda=True, dtype=torch.float64)
    cpu32 = SimpleNamespace(is_cuda=False, dtype=torch.float32)
    assert dispatch.use_triton(cuda32) and dispatch.use_triton(cuda_bf16)
    assert not dispatch.use_triton(cuda64)
    assert not dispatch.use_triton(cuda32, cpu32)


def test_attention_in_fp32_on_a_gpu_takes_the_reference_under_auto_and_triton():
    """dispatch decides fp32 attention on a GPU (SDPA: Triton's exact fp32 dots have no tensor cores); the other
    kernels and 16-bit attention follow use_triton, and fp32 in the interpreter (CPU) goes to the kernel."""
    cuda32 = SimpleNamespace(is_cuda=True, dtype=torch.float32)
    cuda_bf16 = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    cuda16 = SimpleNamespace(is_cuda=True, dtype=torch.float16)
    for backend in ("auto", "triton"):
        assert not dispatch.use_triton_attention(cuda32, backend) and dispatch.use_triton(cuda32, backend=backend)
        assert dispatch.use_triton_attention(cuda_bf16, backend) and dispatch.use_triton_attention(cuda16, backend)
    assert not dispatch.use_triton_attention(cuda_bf16, "reference")
    assert dispatch.use_triton_attention(torch.randn(1, 5, 2, 32), "triton")  # TRITON_INTERPRET=1 here


def test_triton_backend_runs_the_kernels_under_the_interpreter(spies):
    _call_all(backend="triton")
    assert [c[0] for c in spies] == ["triton"] * 3
    _call_all(backend="reference")
    assert [c[0] for c in spies[3:]] == ["reference"] * 3


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*model.kernels=reference"):
        dispatch.apply_rotary(torch.randn(1, 5, 2, 32), *reference.rotary_tables(5, 32), backend="triton")


def test_the_environment_variable_is_not_read_on_a_call(spies, monkeypatch):
    """AF_KERNELS neither overrides the explicit backend nor the default: only entry points read it."""
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    _call_all(backend="reference")
    _call_all()  # auto, CPU tensors
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    _call_all(backend="triton")
    assert [c[0] for c in spies] == ["reference"] * 6 + ["triton"] * 3


def test_unknown_backends_are_rejected():
    with pytest.raises(ValueError, match="unknown kernels backend 'cuda'"):
        dispatch.check_backend("cuda")
    with pytest.raises(ValueError, match="unknown kernels backend 'cuda'"):
        dispatch.apply_rotary(torch.randn(1, 5, 2, 32), *reference.rotary_tables(5, 32), backend="cuda")
    assert dispatch.backend_from_environment({}) is None
    assert dispatch.backend_from_environment({"AF_KERNELS": ""}) is None
    assert dispatch.backend_from_environment({"AF_KERNELS": "reference", "OTHER": "x"}) == "reference"
    with pytest.raises(ValueError, match="AF_KERNELS='fast' is not a kernels backend; use one of auto, triton"):
        dispatch.backend_from_environment({"AF_KERNELS": "fast"})


def test_training_entry_point_turns_the_environment_variable_into_the_recipes_kernels_choice(tmp_path):
    """af_train.train reads AF_KERNELS once into the recipe (applied last, so it wins over a command-line
    override, as before) and records it with the recipe's source."""
    from af_train.config import Recipe
    from af_train.train import kernels_override

    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  preset: tiny\n  kernels: triton\n")
    assert Recipe.load(path, ["model.kernels=auto", *kernels_override({})]).model.kernels == "auto"
    recipe = Recipe.load(path, ["model.kernels=auto", *kernels_override({"AF_KERNELS": "reference"})])
    assert recipe.model.kernels == "reference" and "model.kernels=reference" in recipe.source


def test_entry_points_refuse_an_unknown_environment_backend_naming_it(tmp_path, monkeypatch, capsys):
    """Refused before any work: af-train before training, af-evaluate before reading the run, af-predict and
    af-embed before loading the model."""
    from af_train.evaluate import main as evaluate_main
    from af_train.inference import InferenceError
    from af_train.inference.cli_common import build_tagger
    from af_train.train import main as train_main

    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  preset: tiny\n")
    monkeypatch.setenv("AF_KERNELS", "fast")
    assert train_main(["--recipe", str(path)]) == 2
    assert "AF_KERNELS='fast' is not a kernels backend" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="AF_KERNELS='fast' is not a kernels backend"):
        evaluate_main([str(tmp_path / "no_run")])
    with pytest.raises(InferenceError, match="AF_KERNELS='fast' is not a kernels backend"):
        build_tagger(argparse.Namespace(model=str(tmp_path / "no_model")))


def test_inference_entry_points_pass_the_environment_backend_to_the_encoder(monkeypatch):
    from af_train.inference import AudioTagger
    from af_train.inference.cli_common import build_tagger

    loaded = SimpleNamespace(encoder=SimpleNamespace(kernels="auto"))
    monkeypatch.setattr(AudioTagger, "load", classmethod(lambda cls, *args, **kwargs: loaded))
    args = argparse.Namespace(model="m", checkpoint=None, weights=None, manifest=None, tokenizer=None, device="cpu",
                              hop=None, batch_size=1, encode_batch_size=None)
    monkeypatch.delenv("AF_KERNELS", raising=False)
    assert build_tagger(args).encoder.kernels == "auto"
    monkeypatch.setenv("AF_KERNELS", "reference")
    assert build_tagger(args).encoder.kernels == "reference"


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
        results[backend] = (
            dispatch.apply_rotary(q, cos, sin, False, backend=backend),
            dispatch.rotary_attention(q, k, v, cos, sin, mask, backend=backend),
            dispatch.mpc_loss(embeddings, groups, 0.1, backend=backend),
        )
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
