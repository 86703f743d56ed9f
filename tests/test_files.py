"""af_train.files: atomic writes leave the old file or the whole new one; hashes match hashlib/xxhash;
the source commit of a git checkout."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
import xxhash

from af_train.files import atomic_open, atomic_write, git_commit, sha256_file, sha256_files, xxh64_file


def test_atomic_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    assert atomic_write(target, "first\n") == target
    assert target.read_text(encoding="utf-8") == "first\n"
    atomic_write(target, b"\x00second")
    assert target.read_bytes() == b"\x00second"
    atomic_write(target, "é")  # text is written as UTF-8
    assert target.read_bytes() == "é".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_open(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_hashes_match_the_reference_implementations(tmp_path):
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    data_a, data_b = bytes(range(256)) * 5000, b"tail"  # over one 1 MiB read chunk
    first.write_bytes(data_a)
    second.write_bytes(data_b)
    assert sha256_file(first) == hashlib.sha256(data_a).hexdigest()
    assert sha256_files([first, second]) == hashlib.sha256(data_a + data_b).hexdigest()
    assert xxh64_file(first) == xxhash.xxh64(data_a).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert xxh64_file(empty) == "ef46db3751d8e999"  # the published XXH64 of no input, seed 0


def test_git_commit_names_the_checkout_and_whether_it_is_dirty(tmp_path):
    assert git_commit(tmp_path) == {"commit": None, "dirty": None}  # not a checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "file.txt").write_text("x")
    subprocess.run([*git, "add", "file.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    head = (tmp_path / ".git" / "HEAD").read_text().split()[-1]
    commit = (tmp_path / ".git" / head).read_text().strip()
    assert git_commit(tmp_path) == {"commit": commit, "dirty": False}
    (tmp_path / "experiments" / "results" / "one").mkdir(parents=True)  # af-experiment's own output: not dirty
    (tmp_path / "experiments" / "results" / "one" / "results.json").write_text("{}")
    assert git_commit(tmp_path / "experiments") == {"commit": commit, "dirty": False}
    (tmp_path / "new_module.py").write_text("x = 1")  # any other untracked file is
    assert git_commit(tmp_path) == {"commit": commit, "dirty": True}
    (tmp_path / "new_module.py").unlink()
    (tmp_path / "file.txt").write_text("changed")
    assert git_commit(tmp_path) == {"commit": commit, "dirty": True}


def test_output_problem_names_each_case_before_anything_is_written(tmp_path):
    from af_train.files import output_problem

    given = tmp_path / "in.wav"
    given.write_bytes(b"input")
    (tmp_path / "plain").write_text("a file")
    assert output_problem(tmp_path / "new" / "deeper" / "out.json") is None  # parents are created
    assert "is a folder; give a file name" in output_problem(tmp_path)
    assert "exists; give another --out, or pass --overwrite" in output_problem(tmp_path / "plain")
    assert output_problem(tmp_path / "plain", overwrite=True) is None
    for overwrite in (False, True):
        assert "is also an input" in output_problem(tmp_path / "in.wav", overwrite=overwrite, inputs=[given])
    assert "is not a folder" in output_problem(tmp_path / "plain" / "out.json")
    assert "is a file; give a folder" in output_problem(tmp_path / "plain", folder=True)
    assert output_problem(tmp_path, folder=True) is None
    assert output_problem(tmp_path / "plain", option="--report").startswith("--report ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.wav", "plain"]  # checking wrote nothing
