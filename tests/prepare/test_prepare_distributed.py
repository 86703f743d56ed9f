"""af-prepare on several ranks through the real DeepSpeed launcher (CPU, gloo): two simulated nodes x 1 rank
equal one process, and a damaged part is named at merge; kill -9 of one of two local ranks, then a rerun
redoes only that rank's unfinished chunks; the launcher environment is read from deepspeed/torchrun, SLURM
and Open MPI. Tiny data (one-second clips, a 2 x 32 mel-rvq): the cost is the processes' start-up."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from streaming import LocalDataset

from af_train import prepare as prep
from af_train.distributed import LaunchPlacement, launch_placement
from af_train.launcher import free_port
from af_train.prepare.parts import owns_chunk
from af_train.shards import Manifest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread(single_torch_thread):
    yield


@pytest.fixture(scope="module")
def mixed_csv(synthetic_audio, tmp_path_factory) -> Path:
    """The synthetic clips as one split, plus one file of each audio reject (missing, silent, too short) and
    two label-level rejects (unknown label, duplicate id): 19 tasks, so 10 chunks of 2."""
    root = tmp_path_factory.mktemp("mixed")
    with open(synthetic_audio / "labels.csv", newline="") as f:
        rows = [{"id": r["id"], "path": str(synthetic_audio / r["path"]), "labels": r["labels"]}
                for r in csv.DictReader(f)]
    sf.write(str(root / "silent.wav"), np.zeros(16000), 16000)
    sf.write(str(root / "short.wav"), np.sin(np.arange(1600) / 5.0) * 0.3, 16000)  # 0.1 s < --min-seconds
    rows[3:3] = [{"id": "gone", "path": str(root / "missing.wav"), "labels": rows[0]["labels"]},
                 {"id": "quiet", "path": str(root / "silent.wav"), "labels": rows[0]["labels"]}]
    rows[9:9] = [{"id": "short", "path": str(root / "short.wav"), "labels": rows[0]["labels"]},
                 {"id": "unknown", "path": rows[1]["path"], "labels": "elephant"},
                 {"id": rows[2]["id"], "path": rows[2]["path"], "labels": rows[2]["labels"]}]
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "path", "labels"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "labels.csv"


def _argv(labels_csv: Path, vocabulary: Path, tokenizer: Path, out: Path, chunk: int = 2) -> list[str]:
    return ["--format", "csv", "--input", str(labels_csv), "--labels", str(vocabulary), "--out", str(out),
            "--tokenizer", str(tokenizer), "--clip-seconds", "1.0", "--chunk-size", str(chunk), "--batch-size", "2",
            "--workers", "0", "--threads", "1", "--quiet"]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def _start_two_nodes(argv: list[str], tmp_path: Path, tag: str) -> list[subprocess.Popen]:
    """Two simulated nodes of one rank each: one launcher per node (as under srun), sharing the output folder."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("fake-node-a slots=1\nfake-node-b slots=1\n")
    port = str(free_port())
    processes = []
    for node in (0, 1):
        command = [sys.executable, "-m", "af_train.prepare", *argv, "--hostfile", str(hostfile), "--no_ssh",
                   "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port]
        with open(tmp_path / f"{tag}_node{node}.log", "ab") as log:
            processes.append(subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                              start_new_session=True))
    return processes


def _wait(processes: list[subprocess.Popen], tmp_path: Path, tag: str, timeout: float = 240) -> list[int]:
    codes = []
    for node, process in enumerate(processes):
        try:
            codes.append(process.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for p in processes:
                os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError((tmp_path / f"{tag}_node{node}.log").read_text()[-4000:]) from None
    return codes


def _logs(tmp_path: Path, tag: str) -> str:
    return "".join((tmp_path / f"{tag}_node{n}.log").read_text(errors="replace") for n in (0, 1))


def _read(directory: Path) -> dict[str, dict]:
    ds = LocalDataset(local=str(directory))
    samples = [ds[i] for i in range(len(ds))]
    ids = [s["id"] for s in samples]
    assert len(set(ids)) == len(ids), "a clip written twice"
    return {s["id"]: s for s in samples}


def _assert_same_dataset(mine: Path, reference: Path) -> None:
    left, right = _read(mine), _read(reference)
    assert list(left) == list(right)  # same ids, in the same (input) order
    for clip_id, x in left.items():
        y = right[clip_id]
        assert x["codes"].tobytes() == y["codes"].tobytes(), clip_id
        assert x["labels"].tobytes() == y["labels"].tobytes() and int(x["length"]) == int(y["length"]), clip_id
    ma, mb = Manifest.load(mine), Manifest.load(reference)
    assert (ma.written, ma.rejected, ma.seconds_of_audio, ma.labels, ma.tokenizer) == \
        (mb.written, mb.rejected, mb.seconds_of_audio, mb.labels, mb.tokenizer)
    assert (mine / "rejects.jsonl").read_text() == (reference / "rejects.jsonl").read_text()


@pytest.fixture(scope="module")
def single_process(mixed_csv, synthetic_audio, mel_rvq_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    with_threads = _argv(mixed_csv, synthetic_audio / "vocabulary.txt", mel_rvq_file, out)
    assert prep.main(with_threads) == 0
    return out


def test_two_simulated_nodes_equal_one_process_and_a_damaged_part_is_named(
        single_process, mixed_csv, synthetic_audio, mel_rvq_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _argv(mixed_csv, synthetic_audio / "vocabulary.txt", mel_rvq_file, out)
    assert _wait(_start_two_nodes(argv, tmp_path, "run"), tmp_path, "run") == [0, 0], _logs(tmp_path, "run")[-4000:]
    _assert_same_dataset(out, single_process)
    manifest = Manifest.load(out)
    assert manifest.rejected == {"duplicate_id": 1, "missing_file": 1, "silent": 1, "too_short": 1,
                                 "unknown_label": 1}
    parts = manifest.extra["parts"]
    assert [(p["rank"], p["world_size"], p["chunks"]) for p in parts] == [(0, 2, [0, 2, 4, 6, 8]),
                                                                         (1, 2, [1, 3, 5, 7, 9])]
    assert sum(p["written"] for p in parts) == manifest.written
    assert "all 2 ranks: 19 clips" in _logs(tmp_path, "run")

    # A shard of rank 1's part cut short before the merge (the manifest removed: the merge has not run yet)
    shard = next((out / "part-000003").glob("shard.*.mds"))
    shard.write_bytes(shard.read_bytes()[:-7])
    (out / "manifest.json").unlink()
    capsys.readouterr()
    assert prep.main(argv) == 1  # rerun as a single process: a different rank count re-plans the rest
    err = capsys.readouterr().err
    assert str(shard) in err and "part-000003" in err and "rank 1 of 2" in err, err
    assert not (out / "manifest.json").exists()
    chunks_before = {p: p.stat().st_mtime_ns for p in out.glob("part-*/chunk.json")}
    assert prep.main(argv) == 0  # redoes exactly the damaged chunk
    redone = {p for p in out.glob("part-*/chunk.json") if chunks_before.get(p) != p.stat().st_mtime_ns}
    assert redone == {out / "part-000003" / "chunk.json"}
    _assert_same_dataset(out, single_process)


def _rank_pids(log: Path) -> dict[int, int]:
    text = log.read_text(errors="replace")
    return {int(rank): int(pid) for pid, rank in re.findall(r"process (\d+) spawned with command: .*?--local_rank=(\d)",
                                                            text)}  # local ranks


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to the whole process group of a launcher started with ``start_new_session=True``: the launcher
    and every rank it started (a rank stopped with SIGSTOP too), also when the launcher has already exited."""
    with contextlib.suppress(ProcessLookupError):  # the group is gone: nothing left running
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _committed(out: Path) -> dict[int, tuple[int, int]]:
    """chunk index -> (rank that committed it, mtime of its marker)."""
    done = {}
    for marker in out.glob("part-*/chunk.json"):
        try:
            info = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        done[info["chunk"]] = (info["rank"], marker.stat().st_mtime_ns)
    return done


def test_kill_9_of_one_rank_then_rerun_redoes_only_its_unfinished_chunks(
        mixed_csv, synthetic_audio, mel_rvq_file, tmp_path):
    # the mixed set 4 times over (ids made distinct): 76 chunks of one clip, so rank 1 is caught mid-way
    with open(mixed_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    labels_csv = tmp_path / "labels.csv"
    with open(labels_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "path", "labels"])
        writer.writeheader()
        writer.writerows({**r, "id": f"{r['id']}#{rep}"} for rep in range(4) for r in rows)
    vocabulary = synthetic_audio / "vocabulary.txt"
    assert prep.main(_argv(labels_csv, vocabulary, mel_rvq_file, tmp_path / "single", chunk=1)) == 0
    chunks = 4 * (len(rows) - 2)  # one clip per chunk; the unknown label and the duplicate id are no task
    out = tmp_path / "out"
    argv = _argv(labels_csv, vocabulary, mel_rvq_file, out, chunk=1)
    log = tmp_path / "killed.log"
    with open(log, "ab") as sink:  # one launcher, two local CPU ranks
        launcher = subprocess.Popen([sys.executable, "-m", "af_train.prepare", *argv, "--num_cpu_ranks", "2"],
                                    cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env=_env(),
                                    start_new_session=True)
    try:  # whatever fails below, no rank of this launcher is left running
        deadline = time.monotonic() + 240
        pids: dict[int, int] = {}
        while 1 not in pids:  # the launcher names each rank's process
            assert time.monotonic() < deadline and launcher.poll() is None, log.read_text()[-3000:]
            pids = _rank_pids(log)
            time.sleep(0.05)
        while not any(rank == 1 for rank, _ in _committed(out).values()):
            assert time.monotonic() < deadline and launcher.poll() is None, log.read_text()[-3000:]
            time.sleep(0.002)
        os.kill(pids[1], signal.SIGSTOP)  # rank 1 frozen after its first commit, in the middle of its part
        rank0_chunks = {k for k in range(chunks) if owns_chunk(k, 0, 2)}
        while not rank0_chunks <= set(_committed(out)):  # rank 0 finishes its part, then waits for rank 1
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        before = _committed(out)
        os.kill(pids[1], signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0 and not (out / "manifest.json").exists()
    finally:
        _kill_group(launcher)
    unfinished = set(range(chunks)) - set(before)
    assert unfinished and all(owns_chunk(k, 1, 2) for k in unfinished)

    rerun = subprocess.run([sys.executable, "-m", "af_train.prepare", *argv, "--num_cpu_ranks", "2"], cwd=REPO,
                           env=_env(), capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    after = _committed(out)
    redone = {k for k in after if before.get(k) != after[k]}
    assert redone == unfinished  # only rank 1's unfinished chunks; every committed chunk kept as it was
    print(f"kill -9 of rank 1 after {sum(r == 1 for r, _ in before.values())} of its {chunks // 2} chunks: the "
          f"rerun redid {len(redone)} chunks, kept {len(before)}")
    assert all(after[k][0] == 1 for k in redone)
    _assert_same_dataset(out, tmp_path / "single")  # no duplicate, no missing clip, same codes


@pytest.mark.parametrize("env, expected", [
    ({}, LaunchPlacement(0, 1, 0, 1, "none")),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "2"}, LaunchPlacement(3, 8, 1, 2, "torch")),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"},
     LaunchPlacement(1, 4, 1, 4, "torch")),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_NTASKS_PER_NODE": "8(x2)"},
     LaunchPlacement(5, 16, 5, 8, "slurm")),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     LaunchPlacement(2, 3, 0, 1, "mpi")),
])
def test_launch_placement_reads_each_launcher(env, expected):
    assert launch_placement(env) == expected


def test_launch_placement_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="SLURM_PROCID=4 is outside SLURM_NTASKS=4"):
        launch_placement({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"})


def test_every_chunk_has_exactly_one_owner():
    for world in (1, 2, 3, 8):
        owners = [[r for r in range(world) if owns_chunk(k, r, world)] for k in range(50)]
        assert all(len(o) == 1 for o in owners)
        assert {o[0] for o in owners} == set(range(world))


def test_launcher_options_start_the_launcher_and_are_refused_under_one(monkeypatch, capsys, tmp_path):
    (tmp_path / "l.csv").write_text("path,labels\na.wav,x\n")
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command: calls.append(command) or 0)
    argv = ["--format", "csv", "--input", str(tmp_path / "l.csv"), "--out", str(tmp_path / "o")]
    assert prep.main([*argv, "--num_cpu_ranks", "2", "--master_port", "29123"]) == 0
    line = " ".join(calls[0])
    assert "--num_gpus 2 --master_port 29123 --module af_train.prepare --format csv" in line
    assert "--num_cpu_ranks" not in line and line.endswith(f"--out {tmp_path / 'o'}")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    with pytest.raises(SystemExit):
        prep.main([*argv, "--num_cpu_ranks", "2"])
    assert "already runs under one (slurm, rank 0 of 2)" in capsys.readouterr().err
