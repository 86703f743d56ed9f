"""af-train's pre-flight: what would stop every rank at start-up is a one-line error before the launcher
starts (val/test shards of another tokenizer), and clips of another length in val/test are warned about."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from af_train.train import launch_main


def _copy_with(manifest_dir, out, **changes):
    """A shard directory whose manifest.json is ``manifest_dir``'s with ``changes`` applied."""
    shutil.copytree(manifest_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for key, value in changes.items():
        target = manifest
        *parents, last = key.split(".")
        for part in parents:
            target = target[part]
        target[last] = value
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _argv(shards, val, tmp_path):
    return ["--num_cpu_ranks", "1", "--recipe", "recipes/tiny_ft1.yaml", f"data.train={shards / 'train'}",
            f"data.val={val}", f"data.test={shards / 'test'}", f"train.run_dir={tmp_path / 'run'}"]


@pytest.fixture
def no_launch(monkeypatch):
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("the launcher was started"))


def test_val_shards_of_another_tokenizer_are_a_one_line_error_before_launch(prepared_shards, tmp_path, capsys,
                                                                           no_launch, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[2])
    val = _copy_with(prepared_shards / "val", tmp_path / "val", **{"tokenizer.weights": "random-init seed 7",
                                                                   "codec.weights": "random-init seed 7"})
    assert launch_main(_argv(prepared_shards, val, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("af-train: error: data.train") and "different tokenizers" in err[0]


def test_val_clips_of_another_length_are_warned_before_launch(prepared_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[2])
    launched = []
    monkeypatch.setattr(subprocess, "call", lambda command: launched.append(command) or 0)
    val = _copy_with(prepared_shards / "val", tmp_path / "val", clip_seconds=2.5, frames=188)
    assert launch_main(_argv(prepared_shards, val, tmp_path)) == 0 and len(launched) == 1
    err = capsys.readouterr().err
    assert "af-train: warning: data.val holds clips of 2.5 s, data.train clips of 1 s" in err
    launched.clear()
    assert launch_main(_argv(prepared_shards, prepared_shards / "val", tmp_path)) == 0 and len(launched) == 1
    assert "warning" not in capsys.readouterr().err


def test_af_evaluate_checks_its_out_before_reading_the_run(tmp_path):
    from af_train.evaluate import main as evaluate_main

    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    notes = tmp_path / "notes.json"
    notes.write_text("the user's")
    run = tmp_path / "no_run"  # nothing is read: the check comes first
    with pytest.raises(SystemExit, match=r"af-evaluate: error: --out .*model\.pt is also an input"):
        evaluate_main([str(run), "--weights", str(weights), "--out", str(weights), "--overwrite"])
    with pytest.raises(SystemExit, match=r"notes\.json exists; give another --out, or pass --overwrite"):
        evaluate_main([str(run), "--out", str(notes)])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match=r"is not a folder"):
        evaluate_main([str(run), "--out", str(tmp_path / "a_file" / "eval.json")])
    assert weights.read_bytes() == b"weights" and notes.read_text() == "the user's"


def test_val_shards_with_another_class_order_are_a_one_line_error_before_fine_tuning(prepared_shards, tmp_path,
                                                                                      capsys, no_launch, monkeypatch):
    """The same audio and codes, the class list written in another order (another --labels file): every class
    index means another class in val, so fine-tuning is refused before any rank starts; MLM pretraining,
    which reads no labels, is not."""
    from af_train.shards import labels_hash

    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[2])
    labels = json.loads((prepared_shards / "val" / "manifest.json").read_text())["labels"]
    permuted = labels[1:] + labels[:1]
    val = _copy_with(prepared_shards / "val", tmp_path / "val", labels=permuted, labels_hash=labels_hash(permuted))
    assert launch_main(_argv(prepared_shards, val, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("af-train: error: data.train") and "class" in err[0]
    assert "--labels" in err[0]  # the fix
    monkeypatch.setattr(subprocess, "call", lambda command: 0)
    pretrain = [a.replace("tiny_ft1.yaml", "tiny_pretrain.yaml") for a in _argv(prepared_shards, val, tmp_path)]
    assert launch_main(pretrain) == 0


def test_the_split_checks_read_each_val_and_test_manifest_once(prepared_shards, monkeypatch):
    """Tokenizer, class list and clip length are checked in one pass: a bucket's manifest is one download."""
    from af_train.config import DataConfig
    from af_train.data import splits as loader
    from af_train.shards import Manifest

    reads = []
    real = loader.load_manifest
    monkeypatch.setattr(loader, "load_manifest", lambda source, **kw: reads.append(str(source)) or real(source, **kw))
    cfg = DataConfig(train=str(prepared_shards / "train"), val=str(prepared_shards / "val"),
                     test=str(prepared_shards / "test"))
    train = Manifest.load(prepared_shards / "train")
    assert loader.check_splits(cfg, train, same_labels=True) == []
    assert sorted(reads) == sorted([str(prepared_shards / "val"), str(prepared_shards / "test")])


def test_a_rank_started_without_af_train_reports_a_class_mix_in_one_line(prepared_shards, tmp_path):
    """``python -m af_train.train`` (what the launcher runs on each rank, or a user without one): val shards with
    another class order are a one-line error and exit 2, not a traceback."""
    import sys
    from pathlib import Path

    from af_train.shards import labels_hash

    labels = json.loads((prepared_shards / "val" / "manifest.json").read_text())["labels"]
    permuted = labels[1:] + labels[:1]
    val = _copy_with(prepared_shards / "val", tmp_path / "val", labels=permuted, labels_hash=labels_hash(permuted))
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "af_train.train", *_argv(prepared_shards, val, tmp_path)[2:],
                           "objective.init_checkpoint=null"],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                          timeout=300)
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("af_train.train: error (rank 0): data.train") \
        and "--labels" in errors[0], done.stderr[-2000:]


def test_a_val_folder_that_does_not_exist_is_refused_before_launch_not_at_the_first_evaluation(
        prepared_shards, tmp_path, capsys, no_launch, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[2])
    assert launch_main(_argv(prepared_shards, tmp_path / "no such val", tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("af-train: error: data.val:") and "no such val" in err[0], err


def test_the_preflight_imports_no_streaming(prepared_shards, tmp_path):
    """af-train's pre-flight reads the manifests without mosaicml-streaming (which imports transformers and
    scikit-learn: about 8 CPU-seconds before the launcher even starts)."""
    import sys
    from pathlib import Path

    script = ("import sys; from af_train.train import preflight; problem = preflight(sys.argv[1:]); "
              "print(problem, sorted(m for m in ('streaming', 'transformers', 'sklearn') if m in sys.modules))")
    argv = _argv(prepared_shards, prepared_shards / "val", tmp_path)[2:]
    done = subprocess.run([sys.executable, "-c", script, *argv], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "None []", done.stdout
