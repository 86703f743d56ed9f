"""MLM head (masked positions only) vs full-sequence computations, pooling, MPC vs brute force."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from af_train.model import AudioFormerConfig, MLMHead, RoFormerEncoder, masked_mean_pool
from af_train.model.hf import export_roformer
from af_train.objectives import _mlm_loss
from kernels.reference import mpc_loss


def _masked_batch(seed: int, batch: int = 3, seq: int = 18, rate: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1024, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq // 2:] = 0
    ids[mask == 0] = 1024
    chosen = (torch.rand(batch, seq, generator=gen) < rate) & mask.bool()
    chosen[0, 1] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    inputs = torch.where(chosen, torch.full_like(ids, 1025), ids)
    return inputs, mask, labels


def _randomise(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * (0.3 if param.dim() > 1 else 0.5))


@pytest.mark.parametrize("tied", [True, False])
def test_mlm_loss_equals_full_sequence_computation(tied):
    config = AudioFormerConfig.preset("tiny", hidden_dropout_prob=0.0, tie_word_embeddings=tied)
    encoder = RoFormerEncoder(config).eval()
    head = MLMHead(config, encoder.embeddings.word_embeddings)
    _randomise(encoder, 1)
    _randomise(head, 2)
    inputs, mask, labels = _masked_batch(3)
    hidden = encoder(inputs, mask)
    logits, targets = head(hidden, labels)
    loss, accuracy = _mlm_loss(logits, targets)
    assert logits.shape == (int((labels != -100).sum()), config.vocab_size)

    # independent float64 computation over the full sequence, then restricted to masked tokens
    p = {n: t.detach().double() for n, t in head.predictions.named_parameters()}
    decoder = encoder.embeddings.word_embeddings.weight.detach().double() if tied else p["decoder.weight"]
    h = hidden.detach().double()
    t = F.gelu(h @ p["transform.dense.weight"].T + p["transform.dense.bias"])
    t = F.layer_norm(t, (t.shape[-1],), p["transform.LayerNorm.weight"], p["transform.LayerNorm.bias"], 1e-12)
    full_logits = t @ decoder.T + p["bias"]
    naive = F.cross_entropy(full_logits.reshape(-1, config.vocab_size), labels.reshape(-1), ignore_index=-100)
    assert abs(loss.item() - naive.item()) < 1e-5
    picked = labels != -100
    naive_acc = (full_logits.argmax(-1)[picked] == labels[picked]).double().mean()
    assert abs(accuracy.item() - naive_acc.item()) < 1e-9
    if tied:
        assert head.predictions.decoder.weight is encoder.embeddings.word_embeddings.weight
    else:
        assert head.predictions.decoder.weight is not encoder.embeddings.word_embeddings.weight


@pytest.mark.parametrize("tied", [True, False])
def test_mlm_loss_equals_hf_roformer_for_masked_lm(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    config = AudioFormerConfig.preset("tiny", hidden_dropout_prob=0.0, tie_word_embeddings=tied)
    encoder = RoFormerEncoder(config).eval()
    head = MLMHead(config, encoder.embeddings.word_embeddings)
    _randomise(encoder, 4)
    _randomise(head, 5)
    export_roformer(encoder, tmp_path / "mlm", mlm_head=head)
    hf = transformers.RoFormerForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    inputs, mask, labels = _masked_batch(6)
    with torch.no_grad():
        ours, _ = _mlm_loss(*head(encoder(inputs, mask), labels))
        theirs = hf(input_ids=inputs, attention_mask=mask, labels=labels).loss
    assert abs(ours.item() - theirs.item()) < 1e-4
    decoder = hf.get_output_embeddings().weight
    assert (decoder is hf.roformer.embeddings.word_embeddings.weight) == tied


def test_no_masked_token_gives_zero_loss_with_graph():
    config = AudioFormerConfig.preset("tiny")
    encoder = RoFormerEncoder(config)
    head = MLMHead(config, encoder.embeddings.word_embeddings)
    inputs, mask, _ = _masked_batch(7)
    loss, _ = _mlm_loss(*head(encoder(inputs, mask), torch.full_like(inputs, -100)))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    with pytest.raises(ValueError, match="MLM labels must have the shape"):
        head(encoder(inputs, mask), torch.full_like(inputs[:, :-1], -100))


def test_masked_mean_pool_equals_loop():
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(4, 9, 5, generator=gen, dtype=torch.float64)
    mask = torch.zeros(4, 9, dtype=torch.long)
    for row, length in enumerate([9, 3, 1, 0]):
        mask[row, :length] = 1
    pooled = masked_mean_pool(hidden, mask)
    for row in range(3):
        expected = hidden[row][mask[row].bool()].mean(dim=0)
        torch.testing.assert_close(pooled[row], expected)
    assert torch.equal(pooled[3], torch.zeros(5, dtype=torch.float64))  # no real token: zeros, not NaN


def _mpc_brute_force(embeddings, groups, temperature, anchor_mask):
    """docs/ARCHITECTURE.md's MPC formula ("Kernel formulas"), one anchor at a time in float64, Python loops."""
    z = embeddings.double()
    n = z.shape[0]
    losses = []
    for i in range(n):
        if anchor_mask is not None and not bool(anchor_mask[i]):
            continue
        positives = [p for p in range(n) if p != i and int(groups[p]) == int(groups[i])]
        if not positives:
            continue
        sims = [float(torch.dot(z[i], z[a]) / (z[i].norm() * z[a].norm())) for a in range(n)]
        denominator = sum(math.exp(sims[a] / temperature) for a in range(n) if a != i)
        losses.append(-sum(math.log(math.exp(sims[p] / temperature) / denominator) for p in positives)
                      / len(positives))
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mpc_reference_equals_brute_force(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    n, d = 11, 6
    embeddings = torch.randn(n, d, generator=gen, dtype=torch.float64) * 3
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5])  # groups 2 and 4: anchors without positives
    temperature = [0.05, 0.3, 1.0][seed]
    anchor_mask = torch.rand(n, generator=gen) < 0.6
    anchor_mask[0] = True
    for mask in (None, anchor_mask):
        ours = mpc_loss(embeddings, groups, temperature, mask)
        expected = _mpc_brute_force(embeddings, groups, temperature, mask)
        assert abs(ours.item() - expected) < 1e-9 * max(1.0, abs(expected)), (mask, ours.item(), expected)
    # anchors that are all without positives: 0, not NaN
    only_singletons = torch.zeros(n, dtype=torch.bool)
    only_singletons[[5, 8]] = True
    assert mpc_loss(embeddings, groups, temperature, only_singletons).item() == 0.0


def test_mpc_float32_close_to_float64_and_differentiable():
    gen = torch.Generator().manual_seed(9)
    embeddings = torch.randn(8, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    groups = torch.arange(4).repeat_interleave(2)
    assert torch.autograd.gradcheck(lambda e: mpc_loss(e, groups, 0.5), (embeddings,))
    low = mpc_loss(embeddings.detach().float(), groups, 0.05)
    high = mpc_loss(embeddings.detach(), groups, 0.05)
    assert abs(low.item() - high.item()) < 1e-4 * abs(high.item())
