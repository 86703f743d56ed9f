"""kernels.mpc_loss (tiled Triton MPC loss, interpreter, fp32) against float64 computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels.mpc_loss as mpc_module
from kernels import reference
from kernels.mpc_loss import mpc_loss, off_diagonal_logsumexp

pytestmark = pytest.mark.usefixtures("seeded")


def mpc_loss_loops64(embeddings, groups, temperature, anchor_mask=None):
    """docs/ARCHITECTURE.md's MPC formula ("Kernel formulas"), anchor by anchor in float64, not via the reference."""
    z = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    n = z.shape[0]
    losses = []
    for i in range(n):
        if anchor_mask is not None and not bool(anchor_mask[i]):
            continue
        others = [a for a in range(n) if a != i]
        positives = [p for p in others if int(groups[p]) == int(groups[i])]
        if not positives:
            continue
        logits = torch.stack([z[i] @ z[a] for a in others]) / temperature
        log_denominator = torch.logsumexp(logits, dim=0)
        terms = [z[i] @ z[p] / temperature - log_denominator for p in positives]
        losses.append(-torch.stack(terms).mean())
    if not losses:
        return z.sum() * 0.0
    return torch.stack(losses).mean()


def _clip_views(clips: int, views: int) -> torch.Tensor:
    return torch.arange(clips).repeat_interleave(views)


def _check(embeddings, groups, temperature, anchor_mask=None, expected_fn=reference.mpc_loss, atol=2e-5):
    e = embeddings.clone().requires_grad_()
    loss = mpc_loss(e, groups, temperature, anchor_mask)
    loss.backward()
    e64 = embeddings.detach().double().requires_grad_()
    expected = expected_fn(e64, groups, temperature, anchor_mask)
    expected.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert math.isfinite(loss.item())
    torch.testing.assert_close(loss.double(), expected.detach(), atol=atol, rtol=1e-6)
    grad_scale = float(e64.grad.abs().max()) + 1e-12
    torch.testing.assert_close(e.grad.double() / grad_scale, e64.grad / grad_scale, atol=2e-5, rtol=0)
    return loss, e.grad


def test_matches_independent_loops_on_unequal_groups():
    groups = torch.tensor([3, 3, 3, 3, 7, 7, -1, 100, 100, 100, 5])  # sizes 4, 2, 1, 3, 1; any ids
    embeddings = torch.randn(11, 24)
    _check(embeddings, groups, 0.1, expected_fn=mpc_loss_loops64)
    # and the reference twin agrees with the loops
    torch.testing.assert_close(reference.mpc_loss(embeddings.double(), groups, 0.1),
                               mpc_loss_loops64(embeddings, groups, 0.1))


@pytest.mark.parametrize("n,dim", [(75, 48), (130, 96)], ids=["n75-d48", "n130-d96"])
def test_tiles_not_multiple_of_block_with_four_views_per_clip(n, dim):
    groups = _clip_views(n // 4 + 1, 4)[:n]  # the last clip may be short
    groups = groups[torch.randperm(n)]
    _check(torch.randn(n, dim), groups, 0.05)


def test_row_chunks_give_the_same_result(monkeypatch):
    monkeypatch.setattr(mpc_module, "_ROW_CHUNK", 16)  # 75 rows -> 5 chunks, the last one short
    groups = _clip_views(19, 4)[:75]
    _check(torch.randn(75, 40), groups, 0.05, torch.rand(75) > 0.2)


def test_zero_embedding_row_follows_f_normalize():
    embeddings = torch.randn(12, 16)
    embeddings[3] = 0.0  # F.normalize clamps its norm at eps: z = 0, gradient dz / eps
    _check(embeddings, _clip_views(3, 4), 0.1)


def test_anchor_mask_and_anchors_without_positives():
    n = 40
    groups = torch.cat([_clip_views(8, 4), torch.arange(100, 108)])  # 8 singletons without positives
    anchor_mask = torch.rand(n) > 0.4
    anchor_mask[:4] = True
    _, grad = _check(torch.randn(n, 32), groups, 0.07, anchor_mask)
    assert torch.isfinite(grad).all()


def test_no_anchor_with_a_positive_gives_zero_not_nan():
    for groups in (torch.arange(6), torch.tensor([4])):
        e = torch.randn(groups.shape[0], 16, requires_grad=True)
        loss = mpc_loss(e, groups, 0.05)
        loss.backward()
        assert loss.item() == 0.0 and reference.mpc_loss(e.detach(), groups, 0.05).item() == 0.0
        assert torch.equal(e.grad, torch.zeros_like(e))
    # a mask that selects only anchors without positives
    e = torch.randn(6, 16, requires_grad=True)
    loss = mpc_loss(e, torch.tensor([0, 0, 1, 2, 3, 3]), 0.05, torch.tensor([0, 0, 1, 1, 0, 0]).bool())
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(e.grad, torch.zeros_like(e))


def test_half_precision_embeddings():
    groups = _clip_views(5, 4)
    embeddings = torch.randn(20, 32).half()
    loss = mpc_loss(embeddings, groups, 0.1)
    torch.testing.assert_close(loss.double(), reference.mpc_loss(embeddings.double(), groups, 0.1),
                               atol=1e-4, rtol=0)


def test_off_diagonal_logsumexp_and_its_gradient():
    z = torch.nn.functional.normalize(torch.randn(70, 20), dim=-1).requires_grad_()
    upstream = torch.randn(70)
    upstream[::3] = 0.0  # zero upstream gradients (excluded anchors) must not poison the sum
    lse = off_diagonal_logsumexp(z, 0.2)
    lse.backward(upstream)
    z64 = z.detach().double().requires_grad_()
    logits = (z64 @ z64.t() / 0.2).masked_fill(torch.eye(70, dtype=torch.bool), float("-inf"))
    expected = torch.logsumexp(logits, dim=1)
    expected.backward(upstream.double())
    torch.testing.assert_close(lse.double(), expected.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.grad.double(), z64.grad, atol=1e-5, rtol=0)
    lone = off_diagonal_logsumexp(torch.randn(1, 8), 0.1)
    assert lone.item() == float("-inf")


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in bytes) any PyTorch op produces, the interpreter's own argument
    copies included."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_never_materialises_n_by_n():
    n, dim = 300, 8  # N * N = 90000 elements vs N * D = 2400 (float32 everywhere)
    e = torch.randn(n, dim, requires_grad=True)
    groups = _clip_views(75, 4)
    with _LargestTensor() as tracker:
        mpc_loss(e, groups, 0.05).backward()
    assert tracker.largest <= n * dim * 4, tracker.largest
    with _LargestTensor() as naive:
        reference.mpc_loss(e.detach().clone().requires_grad_(), groups, 0.05).backward()
    assert naive.largest >= n * n * 4  # the tracker does see an N x N allocation when there is one


def test_backward_keeps_only_the_input_and_vectors():
    n, dim = 96, 32
    e = torch.randn(n, dim, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.data_ptr() == e.data_ptr(), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = mpc_loss(e, _clip_views(24, 4), 0.05)
    loss.backward()
    assert any(is_input for is_input, _ in saved)
    assert all(numel <= n for is_input, numel in saved if not is_input), saved


def test_clear_errors():
    e = torch.randn(6, 8)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"embeddings \[N, D\]"):
        mpc_loss(torch.randn(6), groups)
    with pytest.raises(ValueError, match=r"groups must be \[N\]"):
        mpc_loss(e, groups[:5])
    with pytest.raises(TypeError, match="integer ids"):
        mpc_loss(e, groups.float())
    with pytest.raises(ValueError, match=r"anchor_mask must be \[N\]"):
        mpc_loss(e, groups, 0.05, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mpc_loss(e, groups, 0.0)
    with pytest.raises(TypeError, match="float64"):
        mpc_loss(e.double(), groups)
