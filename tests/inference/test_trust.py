"""Trust in a run directory (issue 20, items 1-2): labels travel with the weights, and loading for
inference never unpickles code. Uses the shared tiny FT1 run (``tiny_run``, ZeRO-1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from inference_helpers import split_files

from af_train.checkpoint import read_best, read_meta
from af_train.files import xxh64_file
from af_train.inference import AudioTagger, InferenceError
from af_train.shards import labels_hash

REPO = Path(__file__).resolve().parents[2]


class _Payload:
    """Pickles as a call that writes ``marker``: executed by any unpickler that runs pickled code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('executed')",)


def _copy_run(run: Path, dest: Path) -> Path:
    """A copy of ``run`` as an older af_train left it: checkpoints only, no consolidated weights, so every
    entry point consolidates a checkpoint."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("cache", "model.pt", "model.safetensors"))
    shutil.rmtree(dest / "final")
    shutil.rmtree(dest / "best")
    return dest


def _rerecord(ckpt: Path, name: str) -> None:
    """Record the current size and xxh64 of ``name`` in ``af_meta.json``, as an attacker would."""
    meta = read_meta(ckpt)
    meta["files"][name] = {"size": (ckpt / name).stat().st_size, "xxh64": xxh64_file(ckpt / name)}
    (ckpt / "af_meta.json").write_text(json.dumps(meta))


def _permuted_shards(shards: Path, dest: Path) -> Path:
    """``shards`` with the class list of its manifest reversed: what af-prepare writes from the same audio
    and tokenizer with a vocabulary file in another order (the codes are the same)."""
    shutil.copytree(shards, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["labels"] = manifest["labels"][::-1]
    manifest.pop("labels_hash", None)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


# --------------------------------------------------------------------------------------------------
# No code execution through any inference entry point
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "af_state/rank_00000.pt"])
def test_a_pickled_payload_in_a_checkpoint_runs_through_no_entry_point(tiny_run, synthetic_audio, tmp_path,
                                                                        victim):
    from af_train import evaluate
    from af_train.inference import embed, hear, predict

    run = _copy_run(tiny_run, tmp_path / "run")
    tag = read_best(run / "checkpoints")[0]
    ckpt = run / "checkpoints" / tag
    marker = tmp_path / "marker"
    state = torch.load(ckpt / victim, map_location="cpu", weights_only=False)  # (our own file, in the test)
    state["extra"] = _Payload(marker)
    torch.save(state, ckpt / victim)
    _rerecord(ckpt, victim)  # sizes and hashes match: only the allow-list stands in the way
    wav = split_files(synthetic_audio, "test")[0][0]

    with pytest.raises(InferenceError, match=rf"{victim.split('/')[-1]}.*allow-list"):
        AudioTagger.load(run, device="cpu")
    with pytest.raises(InferenceError, match="allow-list"):
        AudioTagger.load(run, checkpoint=ckpt, device="cpu")
    with pytest.raises(InferenceError, match="allow-list"):
        hear.load_model(str(run), device="cpu")
    assert predict.main([str(run), str(wav), "--device", "cpu"]) != 0
    assert embed.main([str(run), str(wav), "--out", str(tmp_path / "emb"), "--device", "cpu"]) != 0
    with pytest.raises(SystemExit, match="allow-list"):
        evaluate.main([str(run), "--checkpoint", str(ckpt), "--device", "cpu"])
    assert not marker.exists()
    # the proof is live: the same file runs its payload when unpickled the old way
    torch.load(ckpt / victim, map_location="cpu", weights_only=False)
    assert marker.read_text() == "executed"


def test_consolidation_gives_deepspeeds_fp32_weights_bit_for_bit(tiny_run):
    """The allow-listed ZeRO-1 consolidation against DeepSpeed's own (unpickling) reader, as a reference."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from af_train.checkpoint import consolidated_state

    for ckpt in sorted((tiny_run / "checkpoints").glob("step_*")):
        ours = consolidated_state(ckpt, raw=True)
        reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        assert sorted(ours) == sorted(reference)
        assert all(torch.equal(ours[name], reference[name]) for name in reference)


def test_a_truncated_file_is_named_in_one_line(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    ckpt = run / "checkpoints" / read_best(run / "checkpoints")[0]
    victim = next(ckpt.glob("zero_pp_rank_0_*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(InferenceError) as caught:
        AudioTagger.load(run, device="cpu")
    message = str(caught.value)
    assert str(victim) in message and "1000 bytes" in message and "\n" not in message
    # consolidated weights: a truncated safetensors file is named too
    weights = tmp_path / "model.safetensors"
    weights.write_bytes((tiny_run / "final" / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(InferenceError) as caught:
        AudioTagger.load(tiny_run, weights=weights, device="cpu")
    assert str(weights) in str(caught.value) and "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------------------
# Labels travel with the weights
# --------------------------------------------------------------------------------------------------


def test_every_weights_file_records_the_class_list(tiny_run, prepared_shards, tmp_path):
    from safetensors import safe_open

    from af_train.inference import export_hf

    labels = json.loads((prepared_shards / "train" / "manifest.json").read_text())["labels"]
    assert json.loads((prepared_shards / "train" / "manifest.json").read_text())["labels_hash"] == labels_hash(labels)
    for ckpt in (tiny_run / "checkpoints").glob("step_*"):
        assert read_meta(ckpt)["labels"] == labels and read_meta(ckpt)["labels_hash"] == labels_hash(labels)
    assert torch.load(tiny_run / "final" / "model.pt", weights_only=True)["labels"] == labels
    for weights in (tiny_run / "final" / "model.safetensors", tiny_run / "best" / "model.safetensors"):
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata()
        assert json.loads(metadata["labels"]) == labels and json.loads(metadata["labels_hash"]) == labels_hash(labels)
        assert json.loads(metadata["tokenizer"])["kind"] == "encodec"
        assert json.loads(metadata["framing"])["max_length"] == 80
    assert json.loads((tiny_run / "best" / "af_best.json").read_text())["tag"] == read_best(tiny_run / "checkpoints")[0]
    out = tmp_path / "hf"
    assert export_hf.main([str(tiny_run / "best" / "model.safetensors"), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(len(labels))] == labels
    assert config["label2id"] == {name: i for i, name in enumerate(labels)}


def test_a_permuted_manifest_is_refused_by_every_loader(tiny_run, prepared_shards, synthetic_audio, tmp_path):
    from af_train import evaluate
    from af_train.inference import export_hf, predict

    permuted = _permuted_shards(prepared_shards / "train", tmp_path / "permuted")
    labels = json.loads((prepared_shards / "train" / "manifest.json").read_text())["labels"]
    difference = rf"class 0 is {labels[0]!r} vs {labels[-1]!r}"
    for kwargs in ({}, {"checkpoint": tiny_run / "checkpoints" / read_best(tiny_run / "checkpoints")[0]},
                   {"weights": tiny_run / "final" / "model.pt"}):
        with pytest.raises(InferenceError, match=difference):
            AudioTagger.load(tiny_run, manifest=permuted, device="cpu", **kwargs)
    with pytest.raises(InferenceError, match=difference):
        AudioTagger.load(tiny_run / "final" / "model.safetensors", manifest=permuted, device="cpu")
    wav = split_files(synthetic_audio, "test")[0][0]
    assert predict.main([str(tiny_run), str(wav), "--manifest", str(permuted), "--device", "cpu"]) != 0
    assert export_hf.main([str(tiny_run / "final" / "model.pt"), str(tmp_path / "hf"), "--manifest",
                           str(permuted)]) != 0
    with pytest.raises(SystemExit, match=difference):
        evaluate.main([str(tiny_run), f"data.test={permuted}", "--split", "test", "--device", "cpu"])
    # with its own manifest (or none), the same file gives its own names
    own = AudioTagger.load(tiny_run / "final" / "model.safetensors", manifest=prepared_shards / "train", device="cpu")
    assert own.labels == labels


def test_weights_without_a_class_list_use_the_manifest_with_a_warning(tiny_run, prepared_shards, tmp_path, caplog):
    payload = torch.load(tiny_run / "final" / "model.pt", weights_only=True)
    del payload["labels"], payload["labels_hash"]
    torch.save(payload, tmp_path / "old.pt")
    with caplog.at_level("WARNING"):
        tagger = AudioTagger.load(tmp_path / "old.pt", manifest=prepared_shards / "train", device="cpu")
    assert tagger.labels == json.loads((prepared_shards / "train" / "manifest.json").read_text())["labels"]
    assert "records no class list" in caplog.text


def test_training_with_a_permuted_val_split_is_refused_before_training(prepared_shards, tmp_path):
    from engine_helpers import single_process_rank

    from af_train.config import Recipe
    from af_train.data.dataset import DataError
    from af_train.engine import Trainer

    permuted = _permuted_shards(prepared_shards / "val", tmp_path / "val_permuted")
    recipe = Recipe.load(REPO / "recipes" / "tiny_ft1.yaml", [
        f"data.train={prepared_shards / 'train'}", f"data.val={permuted}", "objective.init_checkpoint=null",
        f"train.run_dir={tmp_path / 'run'}", "train.max_steps=2", "train.micro_batch_size=4", "data.max_length=80",
    ])
    with single_process_rank(), pytest.raises(DataError, match=r"data\.val .*class 0 is .*--labels"):
        Trainer(recipe, resume="auto")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_init_checkpoint_with_a_permuted_class_list_is_refused(tiny_run, prepared_shards):
    from af_train.config import Recipe
    from af_train.model.checkpoint import CheckpointError
    from af_train.objectives import build_training_module

    manifest = json.loads((prepared_shards / "train" / "manifest.json").read_text())
    labels = manifest["labels"]
    recipe = Recipe.load(REPO / "recipes" / "tiny_ft1.yaml", [
        f"data.train={prepared_shards / 'train'}", f"objective.init_checkpoint={tiny_run / 'final' / 'model.pt'}",
        "data.max_length=80", f"train.run_dir={tiny_run}_unused",
    ])
    with pytest.raises(CheckpointError, match=r"init_checkpoint.*class 0 is"):
        build_training_module(recipe, len(labels), True, manifest["tokenizer"], labels=labels[::-1])
    module = build_training_module(recipe, len(labels), True, manifest["tokenizer"], labels=labels)
    head = torch.load(tiny_run / "final" / "model.pt", weights_only=True)["state_dict"]["classifier.classifier.weight"]
    assert torch.equal(module.classifier.classifier.weight.detach(), head)


def test_resuming_a_checkpoint_of_another_class_list_is_refused(tiny_run, prepared_shards):
    from af_train.checkpoint import CheckpointManager, ResumePoint
    from af_train.config import Recipe
    from af_train.model.checkpoint import CheckpointError

    ckpt = tiny_run / "checkpoints" / read_best(tiny_run / "checkpoints")[0]
    point = ResumePoint(ckpt, read_meta(ckpt), False, None)
    recipe = Recipe.load(tiny_run / "config.yaml")
    labels = read_meta(ckpt)["labels"]
    manager = CheckpointManager(recipe, tiny_run, 0, 1)
    manager.set_labels(labels, point)
    with pytest.raises(CheckpointError, match=r"checkpoint .*class 0 is .*--labels"):
        manager.set_labels(labels[::-1], point)


def test_an_encoder_without_a_classifier_embeds_with_any_manifest(tiny_run, prepared_shards, tmp_path):
    payload = torch.load(tiny_run / "final" / "model.pt", weights_only=True)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if not k.startswith("classifier.")}
    torch.save(payload, tmp_path / "encoder_only.pt")
    permuted = _permuted_shards(prepared_shards / "train", tmp_path / "permuted")
    tagger = AudioTagger.load(tmp_path / "encoder_only.pt", manifest=permuted, device="cpu")
    assert tagger.embedding_size == payload["encoder_config"]["hidden_size"]
