"""Units of the engine's fine-tuning toolkit: the EMA update against float64, layer-wise lr decay by depth."""

from __future__ import annotations

import pytest
import torch

from af_train.ema import EMA
from af_train.model import AudioFormerConfig, RoFormerEncoder
from af_train.objectives import FineTuneModule
from af_train.optim_groups import layer_decay_groups


def _module(multi_label: bool, mixup_prob: float) -> FineTuneModule:
    torch.manual_seed(0)
    config = AudioFormerConfig.preset("tiny", hidden_dropout_prob=0.0, max_position_embeddings=16)
    return FineTuneModule(RoFormerEncoder(config, "reference"), 3, multi_label, [0], mixup_prob=mixup_prob)


def test_ema_update_matches_a_float64_reference():
    torch.manual_seed(1)
    module = torch.nn.Linear(7, 5)
    module.bias.requires_grad_(False)  # frozen parameters are not averaged
    ema = EMA(module, 0.97)
    reference = module.weight.detach().double().clone()
    for _ in range(500):
        with torch.no_grad():
            module.weight.add_(torch.randn_like(module.weight) * 0.1)
        ema.update(module)
        reference = 0.97 * reference + 0.03 * module.weight.detach().double()
    assert set(ema.shadow) == {"weight"} and ema.updates == 500
    # float32 rounding only: 500 steps stay within 4e-7 of the largest weight (the textbook
    # decay * ema + (1 - decay) * w accumulates about twice that here)
    error = (ema.shadow["weight"].double() - reference).abs().max() / reference.abs().max()
    assert error < 4e-7, float(error)
    raw = module.weight.detach().clone()
    with ema.applied(module):
        assert torch.equal(module.weight, ema.shadow["weight"])
    assert torch.equal(module.weight, raw)  # the raw weights come back exactly


def test_layer_decay_scales_follow_depth():
    module = _module(False, 0.0)  # 2 layers: embeddings 0.5**3, layer 0 0.5**2, layer 1 0.5, classifier 1
    groups = layer_decay_groups(module, 1e-3, 0.01, 0.5, 2)
    scale = {id(p): g["lr"] / 1e-3 for g in groups for p in g["params"]}
    for name, param in module.named_parameters():
        if name.startswith("encoder.embeddings."):
            want = 0.125
        elif name.startswith("encoder.encoder.layer."):
            want = 0.5 ** (2 - int(name.split(".")[3]))
        else:
            want = 1.0
        assert scale[id(param)] == pytest.approx(want), name
    assert groups[0]["lr"] == pytest.approx(1e-3)  # the head group first: the logged lr is the base lr
