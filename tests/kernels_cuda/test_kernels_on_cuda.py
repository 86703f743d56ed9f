"""The compiled kernels on a GPU (skipped without one): bf16 attention and the TF32 MPC loss against
float64, the compiled dropout mask against the interpreter's, and every autotune config launched.

Run when a GPU is lent: ``pytest tests/kernels_cuda -q``. Shapes are the model's (attention
[2, 752, 12, 64] bf16 with dropout 0.1; MPC N = 4096, D = 768, t = 0.05).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import autotune

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("compiled_kernels")]

REPO = Path(__file__).resolve().parents[2]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative Frobenius error."""
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-300))


def _attention64(q, k, v, cos, sin, mask, keep, p):
    """float64 RoPE (interleaved) + masked softmax attention + the given dropout keep-mask."""
    from kernels import reference

    qr = reference.apply_rotary(q, cos, sin, True)
    kr = reference.apply_rotary(k, cos, sin, True)
    scores = torch.einsum("bqhd,bkhd->bhqk", qr, kr) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    real = mask.bool().any(dim=1)
    probs = torch.where(real[:, None, None, None], scores.softmax(-1).nan_to_num(0.0), 0.0)
    if keep is not None:
        probs = probs * keep.double() / (1.0 - p)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def _seeded_attention(compiled_kernels, monkeypatch, q, k, v, cos, sin, mask, p):
    attention = compiled_kernels["rotary_attention"]
    seeds = []
    draw = attention.draw_dropout_seed
    monkeypatch.setattr(attention, "draw_dropout_seed", lambda device: seeds.append(draw(device)) or seeds[-1])
    out = attention.rotary_attention(q, k, v, cos, sin, mask, True, dropout_p=p)
    keep = attention.dropout_keep_mask(seeds[0], *q.shape[:1], q.shape[2], q.shape[1], p) if seeds else None
    return out, keep


def _attention_against_float64(compiled_kernels, monkeypatch, q, k, v, mask, p):
    """The compiled attention (forward and backward with a random grad_out) and the float64 reference
    run with the kernel's own dropout mask: (out, expected, [(q.grad, q64.grad), (k..), (v..)])."""
    from kernels import reference

    cos, sin = reference.rotary_tables(q.shape[1], q.shape[3], device="cuda")
    out, keep = _seeded_attention(compiled_kernels, monkeypatch, q, k, v, cos, sin, mask, p)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = _attention64(q64, k64, v64, cos.double(), sin.double(), mask, keep, p)
    expected.backward(grad_out.double())
    return out, expected.detach(), [(q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)]


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bf16_attention_forward_and_backward_against_float64(compiled_kernels, monkeypatch, p):
    torch.manual_seed(0)
    batch, seq, heads, dim = 2, 752, 12, 64
    q, k, v = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    mask = torch.ones(batch, seq, dtype=torch.int64, device="cuda")
    mask[0, 517:] = 0  # padding
    mask[1] = 0  # an empty sequence
    out, expected, grads = _attention_against_float64(compiled_kernels, monkeypatch, q, k, v, mask, p)
    real = slice(0, 1)
    assert _rel(out[real], expected[real]) < 1e-2
    for got, want in grads:
        assert _rel(got[real], want[real]) < 1e-2
    # the empty sequence: output and gradients exactly zero
    assert float(out[1].abs().max()) == 0.0
    assert all(float(t.grad[1].abs().max()) == 0.0 for t in (q, k, v))


def test_mpc_loss_tf32_against_float64(compiled_kernels):
    from kernels import reference

    torch.manual_seed(0)
    n, dim, temperature = 4096, 768, 0.05
    embeddings = torch.randn(n, dim, device="cuda")
    # 4 views per clip that share a direction: realistic positives
    groups = torch.arange(n // 4, device="cuda").repeat_interleave(4)
    embeddings = embeddings + 2.0 * torch.randn(n // 4, dim, device="cuda").repeat_interleave(4, dim=0)
    e = embeddings.clone().requires_grad_()
    loss = compiled_kernels["mpc_loss"].mpc_loss(e, groups, temperature)
    loss.backward()
    e64 = embeddings.double().requires_grad_()
    expected = reference.mpc_loss(e64, groups, temperature)
    expected.backward()
    assert abs(float(loss) - float(expected)) < 2e-3, (float(loss), float(expected))
    assert _rel(e.grad, e64.grad) < 1e-2


def test_compiled_dropout_mask_equals_the_interpreted_one(compiled_kernels, tmp_path):
    seed, batch, heads, seq, p = 1234567, 2, 3, 61, 0.1
    compiled = compiled_kernels["rotary_attention"].dropout_keep_mask(seed, batch, heads, seq, p, device="cuda")
    path = tmp_path / "interpreted.pt"
    script = ("import sys, torch; from kernels.rotary_attention import dropout_keep_mask; "
              f"torch.save(dropout_keep_mask({seed}, {batch}, {heads}, {seq}, {p}, device='cpu'), sys.argv[1])")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    interpreted = torch.load(path)
    assert torch.equal(compiled.cpu(), interpreted)
    assert 0.85 < float(interpreted.float().mean()) < 0.95


class _Pinned:
    """Stands in for an autotuner: launches its kernel with one fixed config."""

    def __init__(self, fn, config):
        self.fn, self.config, self.launches = fn, config, 0

    def __getitem__(self, grid):
        def launch(*args, **meta):
            full = {**meta, **self.config.all_kwargs()}
            self.fn[grid(full) if callable(grid) else grid](*args, **{k: v for k, v in full.items() if v is not None})
            self.launches += 1
        return launch


def _pin(monkeypatch, name: str, config) -> None:
    """Stand a launcher of one config in for the autotuner ``kernels.autotune.TUNERS[name]``."""
    monkeypatch.setattr(".".join(autotune.TUNERS[name]), _Pinned(autotune.launcher(name).fn, config))


@pytest.mark.parametrize("index", range(6))
def test_every_attention_config_launches_and_is_right(compiled_kernels, monkeypatch, index):
    for name in ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"):
        _pin(monkeypatch, name, autotune.launcher(name).configs[index])
    torch.manual_seed(index)
    batch, seq, heads, dim, p = 2, 203, 2, 64, 0.1
    q, k, v = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    mask = torch.ones(batch, seq, dtype=torch.int64, device="cuda")
    mask[1, 150:] = 0
    out, expected, grads = _attention_against_float64(compiled_kernels, monkeypatch, q, k, v, mask, p)
    assert _rel(out, expected) < 1e-2
    for got, want in grads:
        assert _rel(got, want) < 1e-2


def test_every_mpc_and_rope_config_launches_and_is_right(compiled_kernels, monkeypatch):
    from kernels import reference

    mpc, rope = compiled_kernels["mpc_loss"], compiled_kernels["rope"]
    z = torch.nn.functional.normalize(torch.randn(300, 768, device="cuda"), dim=-1)
    logits = (z.double() @ z.double().t() / 0.05).fill_diagonal_(float("-inf"))
    want = torch.logsumexp(logits, dim=1)
    for config in autotune.launcher("mpc_fwd").configs:
        _pin(monkeypatch, "mpc_fwd", config)
        assert float((mpc._lse_forward(z, 0.05).double() - want).abs().max()) < 5e-3
    upstream = torch.randn(300, device="cuda")
    z64 = z.double().requires_grad_()
    torch.logsumexp((z64 @ z64.t() / 0.05).fill_diagonal_(float("-inf")), dim=1).backward(upstream.double())
    lse = want.float()
    for config in autotune.launcher("mpc_bwd").configs:
        _pin(monkeypatch, "mpc_bwd", config)
        assert _rel(mpc._lse_backward(z, lse, upstream, 0.05), z64.grad) < 1e-2
    x = torch.randn(2, 752, 12, 64, device="cuda", dtype=torch.bfloat16)
    cos, sin = reference.rotary_tables(752, 64, device="cuda")
    want = reference.apply_rotary(x.double(), cos.double(), sin.double())
    for config in autotune.launcher("rope").configs:
        _pin(monkeypatch, "rope", config)
        assert _rel(rope.apply_rotary(x, cos, sin), want) < 1e-2


def test_chosen_configs_are_recorded_and_pinned_on_a_fresh_tuner(compiled_kernels):
    from kernels import reference

    attention = compiled_kernels["rotary_attention"]
    q = torch.randn(2, 130, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = reference.rotary_tables(130, 64, device="cuda")
    attention.rotary_attention(q, q, q, cos, sin).sum().backward()
    recorded = autotune.chosen_configs()
    assert recorded["attention_fwd"] and recorded["attention_bwd_dkdv"] and recorded["attention_bwd_dq"]
    assert any(entry["key"][0] == autotune.seq_bucket(130) for entry in recorded["attention_fwd"])
    saved = {name: dict(autotune.launcher(name).cache) for name in recorded}
    for name in recorded:
        autotune.launcher(name).cache.clear()
    assert autotune.pin_configs(recorded) == []
    assert {name: dict(autotune.launcher(name).cache) for name in recorded} == saved
