"""af_train.augment mixup in the fine-tuning module: convex targets, mixed in train mode only."""

from __future__ import annotations

import pytest
import torch

from af_train.augment import Mixup
from af_train.model import AudioFormerConfig, RoFormerEncoder
from af_train.objectives import FineTuneModule


def _module(multi_label: bool, mixup_prob: float) -> FineTuneModule:
    torch.manual_seed(0)
    config = AudioFormerConfig.preset("tiny", hidden_dropout_prob=0.0, max_position_embeddings=16)
    return FineTuneModule(RoFormerEncoder(config, "reference"), 3, multi_label, [0], mixup_prob=mixup_prob)


def _batch(multi_label: bool) -> dict:
    ids = torch.randint(0, 30, (4, 1, 10))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 7:] = 0
    labels = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.float) if multi_label \
        else torch.tensor([0, 2, 1, 2])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_mixup_targets_are_convex_combinations():
    mix = Mixup(0.3)
    one_hot = mix.targets(torch.tensor([0, 2]), 3, multi_label=False)
    assert torch.allclose(one_hot, torch.tensor([[0.3, 0.0, 0.7], [0.7, 0.0, 0.3]]))
    multi = mix.targets(torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]), 3, multi_label=True)
    assert torch.allclose(multi, torch.tensor([[0.3, 1.0, 0.0], [0.7, 1.0, 0.0]]))
    mask = mix.attention_mask(torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert mask.tolist() == [[1, 1, 0], [1, 1, 0]]


@pytest.mark.parametrize("multi_label", [False, True])
def test_mixup_mixes_embeddings_and_targets_in_train_mode_only(multi_label, monkeypatch):
    monkeypatch.setattr("af_train.objectives.modules.draw_mixup", lambda prob, alpha: Mixup(0.3))
    module, plain = _module(multi_label, 1.0), _module(multi_label, 0.0)
    batch = _batch(multi_label)
    seen = {}
    module.encoder.encoder.layer[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("input", args[0]))
    module.encoder.embeddings.register_forward_hook(lambda m, args, out: seen.__setitem__("embedded", out))
    module.train()
    out = module(batch)
    embedded = seen["embedded"]
    assert torch.allclose(seen["input"], 0.3 * embedded + 0.7 * embedded.flip(0))
    # the loss is the classification loss of the mixed targets (computed here from the scores)
    targets = Mixup(0.3).targets(batch["labels"], 3, multi_label)
    scores = out["scores"].float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(scores, targets) if multi_label \
        else -(targets * scores.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(out["loss"], expected)
    module.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(module(batch)["scores"], plain(batch)["scores"])  # evaluation never mixes
