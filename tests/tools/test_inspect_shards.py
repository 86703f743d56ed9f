"""inspect_shards: manifest, counts, decoded samples; errors for non-shard folders and inconsistencies."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

from af_train_tools import inspect_shards

from af_train.shards import Manifest

REPO = Path(__file__).resolve().parents[2]


def test_prints_manifest_counts_and_samples(prepared_shards, capsys):
    assert inspect_shards.main([str(prepared_shards), "-n", "2", "--first-codes", "5"]) == 0
    out = capsys.readouterr().out
    for split in ("train", "val", "test"):
        manifest = Manifest.load(prepared_shards / split)
        assert f"split '{split}'" in out
        assert f"written     {manifest.written} clips" in out
    assert "random-init seed 0" in out and "4 codebooks × 1024 at 75 Hz" in out
    assert "tone, chirp, noise_burst" in out


def test_samples_are_decoded_with_label_names(prepared_shards):
    buffer = io.StringIO()
    facts = inspect_shards.inspect_split(prepared_shards / "train", num_samples=3, first_codes=4, out=buffer)
    manifest = Manifest.load(prepared_shards / "train")
    assert facts["samples_in_index"] == manifest.written
    assert len(facts["samples"]) == 3
    for sample in facts["samples"]:
        assert sample["shape"] == (4, 75) and sample["length"] == 75
        assert set(sample["labels"]) <= set(manifest.labels)
        assert f"id={sample['id']}" in buffer.getvalue()
    rows = [line for line in buffer.getvalue().splitlines() if line.strip().startswith("row ")]
    assert len(rows) == 3 * 4 and all(len(r.split(":")[1].split()) == 5 for r in rows)  # 4 codes + "…"


def test_rejects_are_listed(tmp_path, prepared_shards, capsys):
    split = tmp_path / "val"
    shutil.copytree(prepared_shards / "val", split)
    manifest = Manifest.load(split)
    manifest.rejected = {"silent": 1}
    manifest.save(split)
    (split / manifest.rejects_log).write_text(json.dumps(
        {"id": "q1", "path": "/x/q1.wav", "reason": "silent", "detail": "peak -99 dBFS"}) + "\n")
    assert inspect_shards.main([str(split), "-n", "0"]) == 0
    out = capsys.readouterr().out
    assert "rejected    1 (silent 1)" in out and "q1: silent (peak -99 dBFS)" in out


def test_inconsistent_counts_and_non_shard_folders(tmp_path, prepared_shards, capsys):
    split = tmp_path / "test"
    shutil.copytree(prepared_shards / "test", split)
    manifest = Manifest.load(split)
    manifest.written += 5
    manifest.save(split)
    assert inspect_shards.main([str(split), "-n", "1"]) == 1
    assert "WARNING" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert inspect_shards.main([str(tmp_path / "empty")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert inspect_shards.main([str(tmp_path / "absent")]) == 2
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    assert inspect_shards.main([str(tmp_path / "broken")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_runs_as_a_plain_script(prepared_shards):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_shards.py"), str(prepared_shards / "val"),
                             "-n", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "written     2 clips" in result.stdout
