"""af_train.inference.export_hf (af-export-hf): a fine-tuned module exports to a Hugging Face dir + classifier."""

from __future__ import annotations

import json

import pytest
import torch

from af_train.config import Recipe
from af_train.inference.export_hf import main
from af_train.model import save_encoder, save_module_weights
from af_train.model.hf import import_roformer
from af_train.objectives import build_training_module
from af_train.shards import CodecInfo, Manifest

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

LABELS = ["dog", "rain", "siren"]


def _ft1_weights(tmp_path, multi_label: bool):
    recipe = Recipe.from_dict({
        "model": {"preset": "tiny", "hidden_dropout_prob": 0.0},
        "data": {"code_rows": [0], "train": str(tmp_path / "shards")},
        "objective": {"mode": "ft1"},
    })
    torch.manual_seed(0)
    module = build_training_module(recipe, len(LABELS), multi_label).eval()
    with torch.no_grad():
        module.classifier.classifier.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    path = save_module_weights(module, tmp_path / "weights.pt", recipe.to_dict(), len(LABELS), multi_label)
    Manifest(codec=CodecInfo(), clip_seconds=10.0, frames=750, labels=LABELS, multi_label=multi_label,
             source_format="csv").save((tmp_path / "shards").mkdir() or tmp_path / "shards")
    return module, path


def test_export_module_weights_with_classifier(tmp_path):
    module, path = _ft1_weights(tmp_path, multi_label=True)
    out = tmp_path / "hf"
    assert main([str(path), str(out)]) == 0  # labels found through the recipe's data.train manifest
    head = json.loads((out / "classifier.json").read_text())
    assert head["labels"] == LABELS and head["multi_label"] and head["num_classes"] == 3
    tensors = safetensors_torch.load_file(str(out / "classifier.safetensors"))
    hf = transformers.RoFormerModel.from_pretrained(out).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1024, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    ids[mask == 0] = 1024
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # as classifier.json says
        hf_scores = pooled @ tensors["weight"].T + tensors["bias"]
        ours = module({"input_ids": ids[:, None], "attention_mask": mask})["scores"]
    assert (hf_scores - ours).abs().max() < 1e-5
    assert import_roformer(out).config == module.encoder.config
    provenance = json.loads((out / "af_train_export.json").read_text())
    assert provenance["format"] == "af_train.module/1" and provenance["code_row"] == 0
    assert main([str(path), str(out)]) == 2  # refuses to overwrite without --overwrite
    assert main([str(path), str(out), "--overwrite", "--manifest", str(tmp_path / "shards")]) == 0


def test_export_encoder_checkpoint_and_errors(tmp_path, capsys):
    recipe = Recipe.from_dict({"model": {"preset": "tiny"}})
    module = build_training_module(recipe, 0, False)
    encoder_path = save_encoder(module.encoder, tmp_path / "enc.pt", code_row=1)
    assert main([str(encoder_path), str(tmp_path / "enc_hf")]) == 0
    assert not (tmp_path / "enc_hf" / "classifier.json").exists()
    assert import_roformer(tmp_path / "enc_hf").code_row == 1
    module_path = save_module_weights(module, tmp_path / "pre.pt", recipe.to_dict(), 0, False)
    assert main([str(module_path), str(tmp_path / "mlm_hf"), "--with-mlm-head"]) == 0
    mlm = transformers.RoFormerForMaskedLM.from_pretrained(tmp_path / "mlm_hf")
    torch.testing.assert_close(mlm.cls.predictions.transform.dense.weight,
                               module.mlm_head.predictions.transform.dense.weight)
    back = import_roformer(tmp_path / "mlm_hf")  # a RoFormerForMaskedLM directory imports too
    for name, tensor in module.encoder.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert main([str(encoder_path), str(tmp_path / "x"), "--with-mlm-head"]) == 2
    assert "has no MLM head" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.pt"), str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err
