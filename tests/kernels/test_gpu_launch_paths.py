"""The CUDA branch of each launcher (autotuned kernels, grid lambdas, config meta-parameters), run on
CPU: every autotuner of kernels.autotune.TUNERS is replaced by a stand-in that launches the interpreted
kernel with one of the real autotune configs, so every name the GPU path passes is checked and its
numbers compared."""

from __future__ import annotations

import pytest
import torch

import kernels.mpc_loss as mpc_module
import kernels.rope as rope_module
import kernels.rotary_attention as attention_module
from kernels import autotune, reference

pytestmark = pytest.mark.usefixtures("seeded")


class ConfigLauncher:
    """Stand-in for a triton.autotune object: ``tuned[grid](*args, **meta)`` runs the raw kernel with
    ``config``'s meta-parameters, resolving a callable grid the way the autotuner does."""

    def __init__(self, tuned, pick):
        self.kernel = tuned.fn
        self.config = pick(tuned.configs)
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **meta):
            overlap = set(meta) & set(self.config.kwargs)
            assert not overlap, f"launcher passes {overlap}, which the autotune configs set"
            full = {**meta, **self.config.kwargs}
            self.kernel[grid(full) if callable(grid) else grid](*args, **full)
            self.launches += 1
        return launch


def _block_volume(config) -> int:
    volume = 1
    for name, value in config.kwargs.items():
        if name.startswith("BLOCK"):
            volume *= value
    return volume


@pytest.fixture(params=["smallest", "largest"])
def gpu_branch(request, monkeypatch):
    """Route the launchers through their CUDA branch with the smallest or largest autotune config."""
    pick = min if request.param == "smallest" else max
    for module in (rope_module, attention_module, mpc_module):  # told their kernels are compiled
        monkeypatch.setattr(module, "kernels_interpreted", lambda: False)
        monkeypatch.setattr(module, "check_kernel_inputs", lambda *a, **k: None)
    launchers = {}
    for name, (module, attribute) in autotune.TUNERS.items():
        launcher = ConfigLauncher(autotune.launcher(name), lambda configs: pick(configs, key=_block_volume))
        monkeypatch.setattr(f"{module}.{attribute}", launcher)
        launchers[name] = launcher
    return launchers


def test_rope_gpu_branch(gpu_branch):
    x = torch.randn(2, 19, 3, 32, requires_grad=True)
    cos, sin = reference.rotary_tables(19, 32)
    out = rope_module._ApplyRotary.apply(x, cos, sin, False, False)
    out.backward(torch.ones_like(out))
    x64 = x.detach().double().requires_grad_()
    reference.apply_rotary(x64, cos.double(), sin.double(), False).backward(torch.ones_like(x64))
    torch.testing.assert_close(out, reference.apply_rotary(x.detach(), cos, sin, False), atol=1e-6, rtol=0)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=2e-6, rtol=0)
    assert gpu_branch["rope"].launches == 2


def _attention_inputs():
    """q, k, v [2, 37, 2, 32] (leaf tensors), a mask padding the second sequence from 20, rotary tables."""
    q, k, v = (torch.randn(2, 37, 2, 32, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 37, dtype=torch.int32)
    mask[1, 20:] = 0
    cos, sin = reference.rotary_tables(37, 32)
    return q, k, v, mask, cos, sin


def test_attention_gpu_branch(gpu_branch):
    q, k, v, mask, cos, sin = _attention_inputs()
    out = attention_module._RotaryAttention.apply(q, k, v, cos, sin, mask, True, 32**-0.5, 0.0)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = reference.rotary_attention(q64, k64, v64, cos.double(), sin.double(), mask, True)
    expected.backward(grad_out.double())
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=0)
    launched = [gpu_branch[n].launches for n in ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq")]
    assert launched == [1, 1, 1]


def test_attention_dropout_gpu_branch(gpu_branch, monkeypatch):
    """Dropout through the CUDA launch branch: with the autotune configs' block shapes (not the
    interpreter's square blocks) the three kernels still regenerate the mask that dropout_keep_mask gives."""
    seeds = []
    draw = attention_module.draw_dropout_seed
    monkeypatch.setattr(attention_module, "draw_dropout_seed", lambda device: seeds.append(draw(device)) or seeds[-1])
    q, k, v, mask, cos, sin = _attention_inputs()
    out = attention_module._RotaryAttention.apply(q, k, v, cos, sin, mask, True, 32**-0.5, 0.3)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert len(seeds) == 1
    keep = attention_module.dropout_keep_mask(seeds[0], 2, 2, 37, 0.3)
    qr, kr = (reference.apply_rotary(t.detach().double(), cos.double(), sin.double()).requires_grad_() for t in (q, k))
    v64 = v.detach().double().requires_grad_()
    scores = torch.einsum("bqhd,bkhd->bhqk", qr, kr) * 32**-0.5
    probs = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf")).softmax(-1)
    expected = torch.einsum("bhqk,bkhd->bqhd", probs * keep / 0.7, v64)
    expected.backward(grad_out.double())
    torch.testing.assert_close(out.double(), expected.detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(v.grad.double(), v64.grad, atol=5e-5, rtol=0)
    # dq, dk: compare in the rotated frame (the kernel's gradients are for the unrotated q, k)
    for got, rotated in ((q.grad, qr.grad), (k.grad, kr.grad)):
        want = reference.apply_rotary(rotated, cos.double(), -sin.double())
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=0)


def test_mpc_gpu_branch(gpu_branch):
    z = torch.nn.functional.normalize(torch.randn(150, 24), dim=-1).requires_grad_()
    upstream = torch.randn(150)
    lse = mpc_module._OffDiagonalLogSumExp.apply(z, 0.1)
    lse.backward(upstream)
    z64 = z.detach().double().requires_grad_()
    logits = (z64 @ z64.t() / 0.1).masked_fill(torch.eye(150, dtype=torch.bool), float("-inf"))
    expected = torch.logsumexp(logits, dim=1)
    expected.backward(upstream.double())
    # The CUDA branch rounds z (and the backward's weights) to TF32 to nearest; the interpreter then
    # multiplies those exactly, as the tensor cores do. TF32 keeps 11 significant bits: per row the
    # log-sum-exp (logits up to 1 / t = 10) moves by up to ~1e-3 (seen: 9.6e-4), but without bias (seen:
    # mean 8e-6); truncating to TF32 instead, as the tensor cores do with raw fp32, gives mean -2.4e-3.
    error = lse.double() - expected.detach()
    assert float(error.abs().max()) < 2e-3, float(error.abs().max())
    assert abs(float(error.mean())) < 2e-4, float(error.mean())
    torch.testing.assert_close(z.grad.double(), z64.grad, atol=5e-3 * float(z64.grad.abs().max()), rtol=0)
    assert gpu_branch["mpc_fwd"].launches == 1 and gpu_branch["mpc_bwd"].launches == 1
