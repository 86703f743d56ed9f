"""Objectives built from recipes: losses vs independent computations, frozen rows, gradients, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from af_train.config import Recipe
from af_train.model import (
    CheckpointError,
    RoFormerEncoder,
    load_encoder,
    load_encoder_weights,
    masked_mean_pool,
    save_encoder,
    save_module_weights,
)
from af_train.objectives import BatchError, FineTuneModule, PretrainModule, build_training_module
from kernels.reference import mpc_loss

B, T = 4, 16


def _recipe(mode: str, rows: list[int], preset: str = "tiny", **objective) -> Recipe:
    return Recipe.from_dict({
        "model": {"preset": preset, "hidden_dropout_prob": 0.0, "kernels": "reference"},
        "data": {"code_rows": rows, "max_length": T},
        "objective": {"mode": mode, **objective},
    })


def _batch(seed: int, rows: int, num_classes: int = 5, multi_label: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1024, (B, rows, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 11:] = 0
    mask[3, 6:] = 0
    ids[mask[:, None, :].expand_as(ids) == 0] = 1024
    chosen = (torch.rand(B, rows, T, generator=gen) < 0.3) & mask[:, None, :].bool()
    chosen[:, :, 2] = True
    mlm_labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    inputs = torch.where(chosen, torch.full_like(ids, 1025), ids)
    if multi_label:
        labels = (torch.rand(B, num_classes, generator=gen) < 0.4).float()
    else:
        labels = torch.randint(0, num_classes, (B,), generator=gen)
    return {"ids": [f"clip{i}" for i in range(B)], "input_ids": inputs, "attention_mask": mask,
            "mlm_labels": mlm_labels, "labels": labels}


@pytest.fixture(scope="module")
def row_checkpoints(tmp_path_factory) -> list[str]:
    """One pretrained-format encoder checkpoint per code row 0..3."""
    root = tmp_path_factory.mktemp("rows")
    paths = []
    for row in range(4):
        torch.manual_seed(row)
        module = build_training_module(_recipe("pretrain", [row]), 0, False)
        paths.append(str(save_encoder(module.encoder, root / f"row{row}.pt", code_row=row)))
    return paths


def test_pretrain_single_row_uses_first_row_only():
    torch.manual_seed(0)
    module = build_training_module(_recipe("pretrain", [2, 0]), 0, False)
    assert isinstance(module, PretrainModule) and module.code_row == 2
    batch = _batch(1, rows=2)
    out = module(batch)
    hidden = module.encoder(batch["input_ids"][:, 0], batch["attention_mask"])
    full = module.mlm_head.predictions(hidden)  # full-sequence logits
    expected = F.cross_entropy(full.reshape(-1, full.shape[-1]), batch["mlm_labels"][:, 0].reshape(-1))
    assert abs(out["loss"].item() - expected.item()) < 1e-5
    assert set(out["logs"]) == {"mlm_loss", "mlm_accuracy", "masked_tokens"}
    assert out["logs"]["masked_tokens"].item() == (batch["mlm_labels"][:, 0] != -100).sum().item()
    batch["input_ids"][:, 1] = 0  # the second row is not read
    assert torch.equal(module(batch)["loss"], out["loss"])


def test_joint_rows_mlm_on_all_rows_plus_mpc():
    torch.manual_seed(0)
    module = build_training_module(_recipe("pretrain", [0, 1, 3], joint_rows=True, mpc_weight=0.5), 0, False)
    config = module.encoder.config
    assert config.row_embedding and config.type_vocab_size == 4
    batch = _batch(2, rows=3)
    out = module(batch)
    # independent: each row separately, its codebook row as token type, losses over all masked tokens
    logits, targets, pooled = [], [], []
    for position, row in enumerate([0, 1, 3]):
        ids = batch["input_ids"][:, position]
        hidden = module.encoder(ids, batch["attention_mask"], torch.full_like(ids, row))
        labels = batch["mlm_labels"][:, position]
        logits.append(module.mlm_head.predictions(hidden)[labels != -100])
        targets.append(labels[labels != -100])
        pooled.append(masked_mean_pool(hidden, batch["attention_mask"]))
    mlm = F.cross_entropy(torch.cat(logits), torch.cat(targets))
    embeddings = torch.stack(pooled, dim=1).reshape(B * 3, -1)
    mpc = mpc_loss(embeddings, torch.arange(B).repeat_interleave(3), 0.05)
    assert abs(out["logs"]["mlm_loss"].item() - mlm.item()) < 1e-5
    assert abs(out["logs"]["mpc_loss"].item() - mpc.item()) < 1e-4
    assert abs(out["loss"].item() - (mlm + 0.5 * mpc).item()) < 1e-4
    # the row embedding matters: the same tokens read as another row give another loss
    module.code_rows = [1, 0, 3]
    assert abs(module(batch)["loss"].item() - out["loss"].item()) > 1e-4


@pytest.mark.parametrize("multi_label", [True, False])
def test_ft1_classification_loss(row_checkpoints, multi_label):
    module = build_training_module(_recipe("ft1", [0], init_checkpoint=row_checkpoints[0]), 5, multi_label)
    assert isinstance(module, FineTuneModule) and not module.frozen_encoders
    reference = load_encoder(row_checkpoints[0])
    for name, tensor in reference.state_dict().items():
        assert torch.equal(module.encoder.state_dict()[name], tensor), name
    batch = _batch(3, rows=1, multi_label=multi_label)
    module.eval()
    out = module(batch)
    pooled = masked_mean_pool(reference.eval()(batch["input_ids"][:, 0], batch["attention_mask"]),
                              batch["attention_mask"]).double()
    weight = module.classifier.classifier.weight.double()
    scores = pooled @ weight.T + module.classifier.classifier.bias.double()
    torch.testing.assert_close(out["scores"].double(), scores, atol=1e-5, rtol=1e-5)
    labels = batch["labels"]
    if multi_label:
        p = torch.sigmoid(scores)
        expected = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    else:
        expected = -torch.log_softmax(scores, dim=-1)[torch.arange(B), labels].mean()
        assert "accuracy" in out["logs"]
    assert abs(out["loss"].item() - expected.item()) < 1e-5


def _ft2(row_checkpoints, **objective):
    recipe = _recipe("ft2", [0, 1, 2, 3], init_checkpoint=row_checkpoints[0],
                     frozen_row_checkpoints=row_checkpoints[1:], **objective)
    return build_training_module(recipe, 5, True)


def test_ft2_loss_is_alpha_cls_plus_mpc_over_frozen_rows(row_checkpoints):
    module = _ft2(row_checkpoints, alpha=0.8, temperature=0.05).train()
    batch = _batch(4, rows=4)
    out = module(batch)
    mask = batch["attention_mask"]
    pooled = [masked_mean_pool(module.encoder(batch["input_ids"][:, 0], mask), mask)]
    for row in (1, 2, 3):
        frozen = load_encoder(row_checkpoints[row]).eval()
        pooled.append(masked_mean_pool(frozen(batch["input_ids"][:, row], mask), mask))
    embeddings = torch.stack(pooled, dim=1).reshape(B * 4, -1)
    anchors = torch.zeros(B * 4, dtype=torch.bool)
    anchors[::4] = True
    mpc = mpc_loss(embeddings, torch.arange(B).repeat_interleave(4), 0.05, anchors)
    cls = F.binary_cross_entropy_with_logits(module.classifier(pooled[0]), batch["labels"])
    assert abs(out["logs"]["mpc_loss"].item() - mpc.item()) < 1e-4
    assert abs(out["loss"].item() - (0.8 * cls + 0.2 * mpc).item()) < 1e-4

    mpc_only = _ft2(row_checkpoints, use_classifier=False)
    assert mpc_only.classifier is None
    out = mpc_only(batch)
    assert "scores" not in out and abs(out["loss"].item() - out["logs"]["mpc_loss"].item()) < 1e-6


def test_ft2_frozen_rows_bit_identical_after_steps_and_grads_only_where_expected(row_checkpoints):
    module = _ft2(row_checkpoints)
    frozen_before = {n: t.clone() for n, t in module.frozen_encoders.state_dict().items()}
    trainable_before = {n: p.detach().clone() for n, p in module.encoder.named_parameters()}
    params = [p for p in module.parameters() if p.requires_grad]  # what the engine hands the optimizer
    frozen_ids = {id(p) for p in module.frozen_encoders.parameters()}
    assert frozen_ids and not frozen_ids & {id(p) for p in params}
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    module.train()
    assert all(not f.training for f in module.frozen_encoders)  # eval even under .train()
    assert module.encoder.training
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        out = module(_batch(10 + step, rows=4))
        out["loss"].backward()
        for name, param in module.named_parameters():
            if name.startswith("frozen_encoders."):
                assert param.grad is None, name
            else:
                assert param.grad is not None and torch.count_nonzero(param.grad) > 0, name
        optimizer.step()
    for name, tensor in module.frozen_encoders.state_dict().items():
        assert torch.equal(tensor, frozen_before[name]), name
    assert any(not torch.equal(p, trainable_before[n]) for n, p in module.encoder.named_parameters())
    assert len(optimizer.state) == len(params)


def test_pretrain_gradients_reach_encoder_and_head_only_once_tied():
    module = build_training_module(_recipe("pretrain", [0]), 0, False)
    module(_batch(5, rows=1))["loss"].backward()
    names = [n for n, p in module.named_parameters()]
    assert "mlm_head.predictions.decoder.weight" not in names  # tied: one parameter, listed once
    for name, param in module.named_parameters():
        assert param.grad is not None and torch.count_nonzero(param.grad) > 0, name


def test_untied_decoder_is_its_own_parameter():
    recipe = Recipe.from_dict({"model": {"preset": "tiny", "tie_word_embeddings": False}})
    module = build_training_module(recipe, 0, False)
    decoder = module.mlm_head.predictions.decoder.weight
    assert decoder is not module.encoder.embeddings.word_embeddings.weight
    assert "mlm_head.predictions.decoder.weight" in dict(module.named_parameters())


def test_module_weights_round_trip(tmp_path, row_checkpoints):
    module = _ft2(row_checkpoints)
    with torch.no_grad():
        module.encoder.encoder.layer[0].intermediate.dense.weight.add_(0.5)
    recipe = _recipe("ft2", [0, 1, 2, 3], frozen_row_checkpoints=row_checkpoints[1:])
    path = save_module_weights(module, tmp_path / "weights.pt", recipe.to_dict(), 5, True)
    encoder = RoFormerEncoder(module.encoder.config)
    info = load_encoder_weights(encoder, path)  # takes the trainable encoder, not a frozen one
    assert info["code_row"] == 0
    for name, tensor in module.encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], tensor), name
    loaded = load_encoder(path)
    assert loaded.config == module.encoder.config
    # continuing from module weights also restores a classifier of the same shape
    ft1 = build_training_module(_recipe("ft1", [0], init_checkpoint=str(path)), 5, True)
    assert torch.equal(ft1.classifier.classifier.weight, module.classifier.classifier.weight)
    other = build_training_module(_recipe("ft1", [0], init_checkpoint=str(path)), 7, True)  # new label set
    assert other.classifier.classifier.weight.shape == (7, 64)


def test_missing_and_mismatched_checkpoints_fail_clearly(tmp_path, row_checkpoints):
    with pytest.raises(CheckpointError, match="objective.init_checkpoint: checkpoint '.*nope.pt' does not exist"):
        build_training_module(_recipe("ft1", [0], init_checkpoint=str(tmp_path / "nope.pt")), 5, True)
    small = build_training_module(_recipe("pretrain", [0], preset="small"), 0, False)
    small_path = save_encoder(small.encoder, tmp_path / "small.pt", code_row=0)
    with pytest.raises(CheckpointError) as info:
        build_training_module(_recipe("ft1", [0], init_checkpoint=str(small_path)), 5, True)
    message = str(info.value)
    assert "embeddings.word_embeddings.weight" in message and "[1032, 384]" in message and "[1032, 64]" in message
    assert "hidden_size: 384 vs 64" in message
    with pytest.raises(CheckpointError, match="one entry in objective.frozen_row_checkpoints per frozen code row"):
        build_training_module(_recipe("ft2", [0, 1, 2], frozen_row_checkpoints=row_checkpoints[1:2]), 5, True)
    with pytest.raises(CheckpointError, match="pretrained on code row 2 but is listed for row 1"):
        build_training_module(
            _recipe("ft2", [0, 1, 2], frozen_row_checkpoints=[row_checkpoints[2], row_checkpoints[1]]), 5, True)
    with pytest.raises(CheckpointError, match=r"frozen_row_checkpoints \(row 1\).*has shape"):
        bad = tmp_path / "bad_row1.pt"
        payload = torch.load(row_checkpoints[1], weights_only=True)
        payload["state_dict"]["encoder.layer.1.output.dense.weight"] = torch.zeros(64, 3)
        torch.save(payload, bad)
        build_training_module(_recipe("ft2", [0, 1], frozen_row_checkpoints=[str(bad)]), 5, True)
    not_ours = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, not_ours)
    with pytest.raises(CheckpointError, match="has format None"):
        load_encoder(not_ours)


def test_bad_batches_fail_clearly(row_checkpoints):
    pretrain = build_training_module(_recipe("pretrain", [0]), 0, False)
    batch = _batch(6, rows=1)
    del batch["mlm_labels"]
    with pytest.raises(BatchError, match="mask=True"):
        pretrain(batch)
    ft2 = _ft2(row_checkpoints)
    with pytest.raises(BatchError, match="needs 4 code row"):
        ft2(_batch(7, rows=2))
    ft1 = build_training_module(_recipe("ft1", [0]), 5, False)
    with pytest.raises(BatchError, match="class indices"):
        ft1(_batch(8, rows=1, multi_label=True))
    batch = _batch(8, rows=1, multi_label=False)
    batch["labels"][0] = 9
    with pytest.raises(BatchError, match="out of range"):
        ft1(batch)


def test_bf16_modules_run_forward_and_backward(row_checkpoints):
    """What DeepSpeed's bf16 mode does: the whole module cast to bfloat16, losses still float32."""
    joint = build_training_module(_recipe("pretrain", [0, 1], joint_rows=True), 0, False)
    for module in (_ft2(row_checkpoints), joint):
        module.to(torch.bfloat16).train()
        out = module(_batch(20, rows=len(module.code_rows)))
        assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
        out["loss"].backward()
        assert module.encoder.encoder.layer[0].attention.self.query.weight.grad.dtype == torch.bfloat16


MEL_A = {"kind": "mel-rvq", "rows": 4, "codes": 256, "sha256": "a" * 64, "file": "a.safetensors"}
MEL_B = {**MEL_A, "sha256": "b" * 64, "file": "b.safetensors"}


def test_vocabulary_follows_the_tokenizer_codebook_size():
    module = build_training_module(_recipe("pretrain", [0]), 0, False, tokenizer=MEL_A)
    assert module.encoder.config.vocab_size == 256 + 8 and module.encoder.config.pad_token_id == 256
    assert module.encoder.embeddings.word_embeddings.weight.shape == (264, 64)
    ids = torch.randint(0, 256, (B, 1, T))
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long),
             "mlm_labels": torch.where(torch.rand(B, 1, T) < 0.3, ids, torch.full_like(ids, -100))}
    batch["mlm_labels"][:, :, 0] = ids[:, :, 0]
    assert module.mlm_head.predictions.decoder.weight.shape[0] == 264  # predicts codes and special tokens
    assert torch.isfinite(module(batch)["loss"])
    assert build_training_module(_recipe("pretrain", [0]), 0, False).encoder.config.vocab_size == 1032


def test_checkpoints_of_another_tokenizer_are_refused(tmp_path):
    pretrained = build_training_module(_recipe("pretrain", [0]), 0, False, tokenizer=MEL_A)
    path = save_encoder(pretrained.encoder, tmp_path / "row0.pt", code_row=0, tokenizer=MEL_A)
    row1 = save_encoder(pretrained.encoder, tmp_path / "row1.pt", code_row=1, tokenizer=MEL_A)
    weights = save_module_weights(pretrained, tmp_path / "w.pt", _recipe("pretrain", [0]).to_dict(), 0, False,
                                  tokenizer=MEL_A)
    same = _recipe("ft2", [0, 1], init_checkpoint=str(path), frozen_row_checkpoints=[str(row1)])
    build_training_module(same, 5, True, tokenizer={**MEL_A, "file": "moved/a.safetensors"})  # only the path differs
    for init in (path, weights):
        with pytest.raises(CheckpointError, match=r"objective\.init_checkpoint .* come from different tokenizers.*"
                                                  r"file a\.safetensors.*file b\.safetensors"):
            build_training_module(_recipe("ft1", [0], init_checkpoint=str(init)), 5, True, tokenizer=MEL_B)
    with pytest.raises(CheckpointError, match=r"objective\.init_checkpoint .*different tokenizers"):
        build_training_module(_recipe("pretrain", [0], init_checkpoint=str(weights)), 0, False, tokenizer=MEL_B)
    other_row1 = save_encoder(pretrained.encoder, tmp_path / "row1_b.pt", code_row=1, tokenizer=MEL_B)
    with pytest.raises(CheckpointError, match=r"frozen_row_checkpoints '.*row1_b\.pt' \(row 1\).*different tokenizers"):
        build_training_module(_recipe("ft2", [0, 1], init_checkpoint=str(path),
                                      frozen_row_checkpoints=[str(other_row1)]), 5, True, tokenizer=MEL_A)
    # a file written before identities were recorded has none: nothing to compare, it loads
    legacy = save_encoder(pretrained.encoder, tmp_path / "legacy.pt", code_row=0)
    build_training_module(_recipe("ft1", [0], init_checkpoint=str(legacy)), 5, True, tokenizer=MEL_B)


def _shared_label_loop(embeddings, groups, classes, temperature, anchors) -> float:
    """The option's loss written out anchor by anchor (cosine similarities, every sum as a loop)."""
    z = F.normalize(embeddings.double(), dim=-1)
    total, count = 0.0, 0
    for i in range(len(z)):
        if not anchors[i]:
            continue
        kept = [a for a in range(len(z)) if a != i
                and not (groups[a] != groups[i] and bool((classes[a] & classes[i]).any()))]
        positives = [p for p in range(len(z)) if p != i and groups[p] == groups[i]]
        log_denominator = torch.logsumexp(torch.stack([z[i] @ z[a] / temperature for a in kept]), 0)
        total += float(log_denominator - torch.stack([z[i] @ z[p] / temperature for p in positives]).mean())
        count += 1
    return total / count


def test_dropping_shared_label_negatives_leaves_them_out_of_the_denominator():
    from af_train.objectives.modules import mpc_loss_dropping_shared_label_negatives

    gen = torch.Generator().manual_seed(3)
    clips, rows = 6, 3
    embeddings = torch.randn(clips * rows, 8, generator=gen, dtype=torch.float64)
    groups = torch.arange(clips).repeat_interleave(rows)
    anchors = torch.arange(clips * rows) % rows == 0
    classes = (torch.rand(clips, 5, generator=gen) < 0.4).repeat_interleave(rows, dim=0)
    got = mpc_loss_dropping_shared_label_negatives(embeddings, groups, classes, 0.1, anchors)
    assert got.item() == pytest.approx(_shared_label_loop(embeddings, groups, classes, 0.1, anchors), abs=1e-10)
    assert got.item() < mpc_loss(embeddings, groups, 0.1, anchors).item()  # fewer negatives: a smaller loss
    alone = torch.eye(clips, dtype=torch.bool).repeat_interleave(rows, dim=0)  # no two clips share a class
    assert mpc_loss_dropping_shared_label_negatives(embeddings, groups, alone, 0.1, anchors).item() == pytest.approx(
        mpc_loss(embeddings, groups, 0.1, anchors).item(), abs=1e-12)


def test_the_shared_label_option_reaches_ft2_and_is_refused_where_it_cannot_apply(row_checkpoints):
    from af_train.config import RecipeError
    from af_train.objectives.modules import mpc_loss_dropping_shared_label_negatives

    batch = _batch(6, rows=4)
    plain = _ft2(row_checkpoints, alpha=0.5, temperature=0.1).train()
    dropping = _ft2(row_checkpoints, alpha=0.5, temperature=0.1, mpc_drop_shared_label_negatives=True).train()
    assert dropping.drop_shared_label_negatives and not plain.drop_shared_label_negatives
    out = dropping(batch)
    mask = batch["attention_mask"]
    pooled = [masked_mean_pool(dropping.encoder(batch["input_ids"][:, 0], mask), mask)]
    for row in (1, 2, 3):
        pooled.append(masked_mean_pool(load_encoder(row_checkpoints[row]).eval()(batch["input_ids"][:, row], mask),
                                       mask))
    embeddings = torch.stack(pooled, dim=1).reshape(B * 4, -1)
    anchors = torch.arange(B * 4) % 4 == 0
    classes = (batch["labels"] > 0).repeat_interleave(4, dim=0)
    expected = mpc_loss_dropping_shared_label_negatives(embeddings, torch.arange(B).repeat_interleave(4), classes,
                                                        0.1, anchors)
    assert out["logs"]["mpc_loss"].item() == pytest.approx(expected.item(), abs=1e-5)
    assert abs(out["logs"]["mpc_loss"].item() - plain(batch)["logs"]["mpc_loss"].item()) > 1e-4
    with pytest.raises(RecipeError, match="applies to mode=ft2"):
        _recipe("ft1", [0], mpc_drop_shared_label_negatives=True)


def test_an_ft2_run_with_the_shared_label_option_is_evaluated_as_its_classifier(tmp_path, row_checkpoints):
    """af-evaluate and AudioTagger score an FT2 run as FT1 on its trainable row; the training-loss option does not
    stop them (it is refused on FT1 recipes)."""
    from af_train.evaluate import evaluation_recipe

    recipe = _recipe("ft2", [0, 1, 2, 3], frozen_row_checkpoints=row_checkpoints[1:],
                     mpc_drop_shared_label_negatives=True)
    (tmp_path / "config.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    scored = evaluation_recipe(tmp_path)
    assert scored.objective.mode == "ft1" and scored.data.code_rows == [0]
    assert not scored.objective.mpc_drop_shared_label_negatives
