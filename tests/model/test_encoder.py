"""RoFormerEncoder against Hugging Face RoFormerModel, rotary tables, checkpointing, failure paths."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import af_train.model.encoder as encoder_module
from af_train.model import AudioFormerConfig, RoFormerEncoder
from af_train.model.hf import export_roformer, import_roformer, sinusoidal_positions
from af_train.tokens import SpecialTokens

transformers = pytest.importorskip("transformers")
from transformers import RoFormerConfig, RoFormerModel  # noqa: E402
from transformers.models.roformer.modeling_roformer import RoFormerSinusoidalPositionalEmbedding  # noqa: E402

TOKENS = SpecialTokens(1024)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (init leaves biases at 0 and LayerNorms at 1, which hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if not param.requires_grad:  # Hugging Face's fixed sinusoidal table
                continue
            noise = torch.randn(param.shape, generator=gen)
            if "LayerNorm.weight" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif param.dim() == 1:
                param.copy_(0.2 * noise)
            elif "embeddings" in name:
                param.copy_(noise)
            else:  # linear layers: unit-variance outputs, so attention is far from uniform
                param.copy_(noise * 1.5 / param.shape[1] ** 0.5)


def _batch(batch: int, seq: int, seed: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1024, (batch, seq), generator=gen)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        ids[row, 0] = TOKENS.boa
        ids[row, length - 1] = TOKENS.eoa
    ids[mask == 0] = TOKENS.pad
    return ids, mask


def _tiny(**overrides) -> AudioFormerConfig:
    # 4 heads of 16 so that several rotary pairs and heads are exercised
    return AudioFormerConfig.preset("tiny", num_attention_heads=4, hidden_dropout_prob=0.0, **overrides)


def test_rotary_tables_equal_hf_sinusoidal_positions():
    for head_dim in (16, 64):
        config = AudioFormerConfig.preset("tiny", hidden_size=head_dim * 2, num_attention_heads=2)
        hf_table = RoFormerSinusoidalPositionalEmbedding(config.max_position_embeddings, head_dim)
        hf_table._init_weight()
        ours = sinusoidal_positions(config)
        assert ours.shape == hf_table.weight.shape
        torch.testing.assert_close(ours, hf_table.weight.detach(), atol=2e-7, rtol=0)
        # float64 reference of the formula: angle(t, i) = t / 10000^(2i/d)
        t = torch.arange(config.max_position_embeddings, dtype=torch.float64)[:, None]
        i = torch.arange(head_dim // 2, dtype=torch.float64)[None, :]
        angle = t / 10000.0 ** (2 * i / head_dim)
        cos, sin = RoFormerEncoder(config).rotary_tables(config.max_position_embeddings, torch.device("cpu"))
        torch.testing.assert_close(cos.double(), angle.cos(), atol=1e-7, rtol=0)
        torch.testing.assert_close(sin.double(), angle.sin(), atol=1e-7, rtol=0)


def test_rotary_tables_built_once_per_length(monkeypatch):
    calls = []
    real = encoder_module.rotary_tables

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(encoder_module, "rotary_tables", counting)
    encoder = RoFormerEncoder(_tiny(num_hidden_layers=3)).eval()
    ids, mask = _batch(2, 12, 0, [12, 7])
    with torch.no_grad():
        encoder(ids, mask)
        encoder(ids, mask)
        encoder(ids[:, :8], mask[:, :8])
        encoder(ids, mask)
    assert calls == [12, 8]  # one build per length, shared by all layers and steps


@pytest.mark.parametrize("row_embedding", [False, True])
def test_export_matches_hf_model_with_padding(tmp_path, row_embedding):
    config = _tiny(row_embedding=row_embedding, type_vocab_size=4 if row_embedding else 2)
    encoder = RoFormerEncoder(config).eval()
    _randomise(encoder, seed=1)
    export_roformer(encoder, tmp_path / "hf")
    hf = RoFormerModel.from_pretrained(tmp_path / "hf").eval()
    ids, mask = _batch(3, 40, seed=2, lengths=[40, 29, 6])
    types = torch.full_like(ids, 3) if row_embedding else None
    with torch.no_grad():
        ours = encoder(ids, mask, types)
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() < 2e-5
    # padded positions attend to the real tokens in both implementations: same values there too
    assert (ours[~real] - theirs[~real]).abs().max() < 2e-5
    # the comparison is able to fail: a slightly perturbed weight changes the output
    with torch.no_grad():
        encoder.encoder.layer[1].attention.self.key.weight.mul_(1.05)
        assert (encoder(ids, mask, types)[real] - theirs[real]).abs().max() > 1e-3


def test_every_hidden_state_matches_hf(tmp_path):
    encoder = RoFormerEncoder(_tiny()).eval()
    _randomise(encoder, seed=3)
    export_roformer(encoder, tmp_path / "hf")
    hf = RoFormerModel.from_pretrained(tmp_path / "hf").eval()
    ids, mask = _batch(2, 24, seed=4, lengths=[24, 11])
    with torch.no_grad():
        ours = encoder(ids, mask, output_hidden_states=True)
        theirs = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        last = encoder(ids, mask)
    assert len(ours) == len(theirs) == encoder.config.num_hidden_layers + 1  # embeddings, then every layer
    real = mask.bool()
    for index, (a, b) in enumerate(zip(ours, theirs)):
        assert (a[real] - b[real]).abs().max() < 2e-5, f"hidden state {index}"
    assert torch.equal(ours[-1], last)


def test_hf_model_imports_and_matches(tmp_path):
    hf_config = RoFormerConfig(
        vocab_size=TOKENS.vocab_size, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=96, max_position_embeddings=64, pad_token_id=TOKENS.pad,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, type_vocab_size=2,
    )
    hf = RoFormerModel(hf_config).eval()
    _randomise(hf, seed=3)
    hf.save_pretrained(tmp_path / "foreign")
    encoder = import_roformer(tmp_path / "foreign").eval()
    assert encoder.config.hidden_size == 48 and encoder.config.num_attention_heads == 3
    ids, mask = _batch(2, 33, seed=4, lengths=[33, 17])
    with torch.no_grad():
        ours = encoder(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (ours - theirs).abs().max() < 2e-5
    # a directory whose position table is not RoFormer's sinusoidal one is refused, not half-imported
    with torch.no_grad():
        hf.encoder.embed_positions.weight.mul_(1.01)
    hf.save_pretrained(tmp_path / "tampered")
    with pytest.raises(ValueError, match="not the standard sinusoidal table"):
        import_roformer(tmp_path / "tampered")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        import_roformer(tmp_path / "missing")


def test_export_then_import_is_identity(tmp_path):
    config = _tiny(tie_word_embeddings=False, layer_norm_eps=1e-6)
    encoder = RoFormerEncoder(config)
    _randomise(encoder, seed=5)
    export_roformer(encoder, tmp_path / "hf")
    back = import_roformer(tmp_path / "hf")
    assert back.config == encoder.config
    ours, theirs = encoder.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_base_parameter_count_equals_hf():
    config = AudioFormerConfig.preset("base")
    with torch.device("meta"):
        ours = RoFormerEncoder(config)
    hf_config = RoFormerConfig(
        vocab_size=config.vocab_size, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size, pad_token_id=config.pad_token_id,
    )
    with torch.device("meta"):
        hf = RoFormerModel(hf_config)
    hf_trainable = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    hf_table = hf.encoder.embed_positions.weight.numel()  # fixed sinusoidal table, not a trained weight
    assert ours.num_parameters() == hf_trainable == sum(p.numel() for p in hf.parameters()) - hf_table
    h, i, layers = 768, 3072, 12
    per_layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h  # q,k,v,o + LN + FFN + LN
    embeddings = (config.vocab_size + config.type_vocab_size) * h + 2 * h
    assert ours.num_parameters() == layers * per_layer + embeddings == 85_850_112
    names_ours = {n for n, _ in ours.named_parameters()}
    names_hf = {n for n, p in hf.named_parameters() if p.requires_grad}
    assert names_ours == names_hf


def _grads(encoder, ids, mask, seed):
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = encoder(ids, mask)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_same_gradients():
    config = AudioFormerConfig.preset("tiny", num_hidden_layers=3, hidden_dropout_prob=0.1)
    encoder = RoFormerEncoder(config).train()
    _randomise(encoder, seed=6)
    ids, mask = _batch(2, 20, seed=7, lengths=[20, 13])
    plain = _grads(encoder, ids, mask, seed=11)
    encoder.activation_checkpointing = True
    checkpointed = _grads(encoder, ids, mask, seed=11)  # dropout masks replayed from the saved RNG state
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(encoder.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    other_seed = _grads(encoder, ids, mask, seed=12)  # sanity: dropout does change the gradients
    assert any(not torch.allclose(other_seed[n], plain[n]) for n in plain)


def test_padding_row_gets_no_gradient_and_empty_sequence_is_finite():
    encoder = RoFormerEncoder(_tiny()).train()
    ids, mask = _batch(3, 10, seed=8, lengths=[10, 4, 1])
    mask[2] = 0  # a sequence with no real token at all
    out = encoder(ids, mask)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.count_nonzero(encoder.embeddings.word_embeddings.weight.grad[TOKENS.pad]) == 0


def test_failure_paths_name_the_problem():
    encoder = RoFormerEncoder(_tiny(max_position_embeddings=16))
    ids, mask = _batch(1, 20, seed=9, lengths=[20])
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        encoder(ids, mask)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        encoder(ids[:, :8], mask[:, :7])
    with pytest.raises(ValueError, match="input_ids \\[batch, seq\\]"):
        encoder(ids[0], mask[0])
    with pytest.raises(ValueError, match="unknown AudioFormer preset 'huge'"):
        AudioFormerConfig.preset("huge")
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        AudioFormerConfig.preset("tiny", num_attention_heads=3)
    with pytest.raises(ValueError, match="no field 'hiden_size'"):
        AudioFormerConfig.from_dict({"hiden_size": 3})
    bad = dataclasses.replace(_tiny(), rotary_base=500.0)
    with pytest.raises(ValueError, match="hard-codes a rotary base"):
        export_roformer(RoFormerEncoder(bad), "/nonexistent/never-written")


# --- dropout on the attention probabilities -------------------------------------------------------


def test_attention_dropout_config_range_and_presets():
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"attention_probs_dropout_prob must be in \[0, 1\), got"):
            AudioFormerConfig.preset("tiny", attention_probs_dropout_prob=bad)
    assert AudioFormerConfig.preset("tiny", attention_probs_dropout_prob=0.1).attention_probs_dropout_prob == 0.1
    # RoFormer/BERT's 0.1 for the real sizes; the tiny preset (CPU tests, demo) keeps none
    assert AudioFormerConfig.preset("tiny").attention_probs_dropout_prob == 0.0
    for name in ("small", "base", "large"):
        config = AudioFormerConfig.preset(name)
        assert config.attention_probs_dropout_prob == 0.1 and config.hidden_dropout_prob == 0.1
    # the recipe's model section overrides it
    from af_train.config import Recipe

    recipe = Recipe.from_dict({"model": {"preset": "tiny", "attention_probs_dropout_prob": 0.2}})
    assert AudioFormerConfig.from_recipe(recipe.model).attention_probs_dropout_prob == 0.2
    assert AudioFormerConfig.from_recipe(Recipe.from_dict({"model": {"preset": "base"}}).model) \
        .attention_probs_dropout_prob == 0.1


def _attention_dropout_encoder(p: float, **overrides) -> RoFormerEncoder:
    config = dataclasses.replace(_tiny(**overrides), attention_probs_dropout_prob=p)
    encoder = RoFormerEncoder(config)
    _randomise(encoder, seed=21)
    return encoder


def test_attention_dropout_in_train_mode_only():
    ids, mask = _batch(2, 24, seed=22, lengths=[24, 15])
    encoder = _attention_dropout_encoder(0.1).train()  # hidden dropout 0: only attention dropout is random
    without = _attention_dropout_encoder(0.0)
    without.load_state_dict(encoder.state_dict())
    real = mask.bool()
    with torch.no_grad():
        torch.manual_seed(1)
        first = encoder(ids, mask)
        torch.manual_seed(1)
        again = encoder(ids, mask)
        torch.manual_seed(2)
        other = encoder(ids, mask)
        plain_train = without.train()(ids, mask)
        eval_out = encoder.eval()(ids, mask)
        plain_eval = without.eval()(ids, mask)
    assert torch.equal(first, again)  # same torch seed, same masks
    assert (first - other)[real].abs().max() > 1e-2  # another seed, other masks
    assert (first - plain_train)[real].abs().max() > 1e-2  # the dropout is applied in train mode
    assert torch.equal(plain_train, plain_eval)  # (no other randomness in this model)
    assert torch.equal(eval_out, plain_eval)  # eval mode: no attention dropout at all, bit for bit


def test_export_with_attention_dropout_matches_hf_in_eval_and_round_trips(tmp_path):
    encoder = RoFormerEncoder(AudioFormerConfig.preset("tiny", num_attention_heads=4,
                                                       attention_probs_dropout_prob=0.1)).eval()
    _randomise(encoder, seed=21)
    export_roformer(encoder, tmp_path / "hf")
    hf = RoFormerModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.attention_probs_dropout_prob == 0.1
    ids, mask = _batch(2, 30, seed=23, lengths=[30, 11])
    with torch.no_grad():
        ours = encoder(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (ours - theirs).abs().max() < 2e-5
    back = import_roformer(tmp_path / "hf")
    assert back.config == encoder.config and back.config.attention_probs_dropout_prob == 0.1
    # a foreign RoFormer directory (no af_train config inside) keeps its attention dropout too
    foreign = RoFormerConfig(
        vocab_size=TOKENS.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=TOKENS.pad, attention_probs_dropout_prob=0.15,
    )
    RoFormerModel(foreign).save_pretrained(tmp_path / "foreign")
    assert import_roformer(tmp_path / "foreign").config.attention_probs_dropout_prob == 0.15


def test_activation_checkpointing_replays_attention_dropout():
    encoder = _attention_dropout_encoder(0.1, num_hidden_layers=3).train()
    ids, mask = _batch(2, 20, seed=24, lengths=[20, 13])

    def loss_and_grads(seed):
        encoder.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = encoder(ids, mask)
        loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}

    encoder.activation_checkpointing = False
    plain_loss, plain = loss_and_grads(31)
    encoder.activation_checkpointing = True
    ckpt_loss, checkpointed = loss_and_grads(31)  # the recomputation redraws the same attention masks
    assert torch.equal(ckpt_loss, plain_loss)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(encoder.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    other_loss, other = loss_and_grads(32)  # sanity: the attention masks do change the result
    assert other_loss != plain_loss and any(not torch.allclose(other[n], plain[n]) for n in plain)
