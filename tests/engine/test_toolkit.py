"""The fine-tuning toolkit in the Trainer (1 rank, in process): every option on, resumed bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_inprocess import losses, make_trainer, one_rank  # noqa: F401  (one_rank: the fixture)

from af_train.checkpoint.files import consolidated_state
from af_train.config import Recipe
from af_train.run_logging import read_metrics

FT1 = ["objective.mode=ft1", "train.precision=fp32", "model.hidden_dropout_prob=0.1"]
ALL_ON = ["optim.layer_decay=0.75", "data.finetune_mask_rate=0.2", "objective.mixup.prob=0.5",
          "objective.mixup.alpha=0.5", "train.ema_decay=0.9"]


def _mixture(data_root: Path) -> list[str]:
    return [f"data.train=[{{path: {data_root / 'train'}, repeat: 1.5}}, {{path: {data_root / 'val'}, repeat: 0.5}}]"]


@pytest.mark.parametrize(("sampling", "stage"), [("balanced", 1), ("mixture", 3)])
def test_resume_is_exact_with_every_option_on(one_rank, data_root, tmp_path, sampling, stage):  # noqa: F811
    extra = ["data.balanced_sampling=true", "data.balance_buckets=3"] if sampling == "balanced" \
        else _mixture(data_root)
    overrides = FT1 + ALL_ON + extra + ["train.max_steps=6", "train.save_every=3", "train.eval_every=3",
                                        f"train.zero_stage={stage}"]
    first = make_trainer(data_root, tmp_path / "a", overrides)
    first.fit()
    ema_a = {k: v.clone() for k, v in first.ema.shadow.items()}
    first.close()
    second = make_trainer(data_root, tmp_path / "b", overrides, resume=str(tmp_path / "a/checkpoints/step_00000003"))
    assert second.progress.step == 3 and second.ema.updates == 3
    second.fit()
    ema_b = second.ema.shadow
    second.close()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == [4, 5, 6]
    assert all(a[s] == b[s] for s in (4, 5, 6)), (a, b)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # evaluation used the average and logged the raw weights beside it; final/model.pt holds the average
    val = [r for r in read_metrics(tmp_path / "b") if "val/loss" in r][-1]
    assert "val/raw_loss" in val and val["val/loss"] != val["val/raw_loss"]
    final = torch.load(tmp_path / "b/final/model.pt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(final[k], ema_b[k]) for k in ema_b)
    raw = consolidated_state(tmp_path / "b/checkpoints/step_00000006", raw=True, own_run=True)  # (ZeRO-3 too)
    assert not all(torch.equal(raw[k], ema_b[k]) for k in ema_b)
    # every option is in the run's config.yaml
    saved = Recipe.load(tmp_path / "b/config.yaml")
    assert saved.optim.layer_decay == 0.75 and saved.train.ema_decay == 0.9 and saved.objective.mixup.prob == 0.5
    assert saved.data.finetune_mask_rate == 0.2


def _full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params) if any(hasattr(p, "ds_id") for p in params) \
            else torch.no_grad():
        return {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("stage", [1, 3])
def test_layer_decay_multipliers_and_ema_under_zero(one_rank, data_root, tmp_path, stage):  # noqa: F811
    """Each parameter's first AdamW step is lr x its multiplier (|m/sqrt(v)| = 1 at step 1, eps ~ 0, no weight
    decay): measured on the weights, whatever ZeRO does with the groups. The EMA (decay 0.5) then
    holds the mean of the weights before and after, and final/model.pt holds the EMA."""
    lr, decay = 1e-3, 0.5
    overrides = FT1 + [f"optim.layer_decay={decay}", "optim.weight_decay=0", "optim.eps=1e-12",
                       "optim.warmup_steps=0", f"optim.lr={lr}", "model.hidden_dropout_prob=0.0", "train.max_steps=1",
                       f"train.zero_stage={stage}", "train.ema_decay=0.5", "data.val=null", "train.test_at_end=false"]
    trainer = make_trainer(data_root, tmp_path / "run", overrides)
    module = trainer.engine.module
    layers = module.encoder.config.num_hidden_layers
    before = _full_weights(module)
    trainer.fit()
    after = _full_weights(module)
    trainer.close()
    for name in before:
        if name.startswith("encoder.embeddings."):
            depth = 0
        elif name.startswith("encoder.encoder.layer."):
            depth = int(name.split(".")[3]) + 1
        else:
            depth = layers + 1
        step = float((after[name] - before[name]).abs().max())
        assert step / lr == pytest.approx(decay ** (layers + 1 - depth), rel=1e-2), name
    final = torch.load(tmp_path / "run/final/model.pt", map_location="cpu", weights_only=False)["state_dict"]
    for name in before:
        assert torch.allclose(final[name], 0.5 * (before[name] + after[name]), atol=1e-7), name
