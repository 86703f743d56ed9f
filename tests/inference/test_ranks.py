"""af-embed and af-predict on two CPU ranks (gloo) against one process on the same inputs, bad ones included:
the same embeddings (within 1e-6) with the same ids in the same order, the same prediction lines in the same
order, the same skips by reason, and rows + skips = inputs. af-embed goes through the DeepSpeed launcher
(--num_cpu_ranks 2), af-predict runs as two ranks started with torchrun's environment (the torchrun / srun
path). One start per command (the cost is the ranks' start-up); the single-process outputs are computed
once, in this process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from inference_helpers import split_files

from af_train.inference import embed, predict
from af_train.launcher import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(synthetic_audio, tmp_path_factory) -> list[Path]:
    """Nine inputs: six one-second clips, a 2.5 s file (several windows), a missing file and a
    0.1 s file (too short), placed so that each rank gets one of the bad ones (input k -> rank k mod 2)."""
    root = tmp_path_factory.mktemp("rank_inputs")
    clips = split_files(synthetic_audio, "train")[0][:6]
    pieces = [sf.read(str(p), dtype="float32")[0] for p in clips]
    rate = sf.info(str(clips[0])).samplerate
    sf.write(str(root / "long.wav"), np.concatenate(pieces[:3])[: int(2.5 * rate)], rate)
    sf.write(str(root / "short.wav"), (np.sin(np.arange(rate // 10) / 5.0) * 0.3).astype(np.float32), rate)
    return [*clips[:3], root / "missing.wav", clips[3], root / "short.wav", root / "long.wav", *clips[4:]]


@pytest.fixture(scope="module")
def single_process(tiny_run, inputs, tmp_path_factory) -> dict[str, Path]:
    """What one process writes for ``inputs``: af-embed's folder and af-predict's jsonl."""
    import torch

    out = tmp_path_factory.mktemp("one_process")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (--threads 1): the codec's numerics depend on the thread count
    try:
        assert embed.main([str(tiny_run), *map(str, inputs), "--out", str(out / "emb"), "--device", "cpu",
                           "--keep-going"]) == 0
        assert predict.main([str(tiny_run), *map(str, inputs), "--format", "jsonl", "--windows", "--device", "cpu",
                             "--out", str(out / "pred.jsonl"), "--keep-going"]) == 0
    finally:
        torch.set_num_threads(threads)
    return {"embed": out / "emb", "predict": out / "pred.jsonl"}


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def _through_the_launcher(module: str, argv: list[str], log: Path) -> None:
    """``python -m module argv --num_cpu_ranks 2``: the DeepSpeed launcher starts two CPU ranks."""
    command = [sys.executable, "-m", module, *argv, "--num_cpu_ranks", "2", "--threads", "1", "--device", "cpu"]
    with open(log, "wb") as f:
        code = subprocess.run(command, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                              timeout=300).returncode
    assert code == 0, log.read_text(errors="replace")[-4000:]


def _as_torchrun_ranks(module: str, argv: list[str], log: Path) -> None:
    """Two processes with the environment torchrun gives its ranks (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*): the
    path of torchrun and srun, and three processes fewer to start than the launcher."""
    port = str(free_port())
    processes = []
    with open(log, "wb") as f:
        for rank in (0, 1):
            env = dict(_env(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            command = [sys.executable, "-m", module, *argv, "--threads", "1", "--device", "cpu"]
            processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT))
        try:
            codes = [p.wait(timeout=300) for p in processes]
        finally:
            for p in processes:
                if p.poll() is None:
                    p.kill()
    assert codes == [0, 0], log.read_text(errors="replace")[-4000:]


def _skips(failures_jsonl: Path) -> list[tuple[str, str]]:
    return [(r["id"], r["reason"]) for r in map(json.loads, failures_jsonl.read_text().splitlines())]


def test_af_embed_on_two_ranks_equals_one_process(tiny_run, inputs, single_process, tmp_path):
    out = tmp_path / "emb"
    # --part-size 2: each rank commits two parts, the merge interleaves four
    argv = [str(tiny_run), *map(str, inputs), "--out", str(out), "--keep-going", "--part-size", "2"]
    _through_the_launcher("af_train.inference.embed", argv, tmp_path / "embed.log")
    reference = single_process["embed"]
    ids = [json.loads(line) for line in (out / "ids.jsonl").read_text().splitlines()]
    assert ids == [json.loads(line) for line in (reference / "ids.jsonl").read_text().splitlines()]
    matrix, expected = np.load(out / "embeddings.npy"), np.load(reference / "embeddings.npy")
    assert matrix.shape == expected.shape and matrix.dtype == expected.dtype
    np.testing.assert_allclose(matrix, expected, rtol=0, atol=1e-6)
    assert _skips(out / "failures.jsonl") == _skips(reference / "failures.jsonl") == [
        (str(inputs[3]), "missing_file"), (str(inputs[5]), "too_short")]
    assert len(inputs) == 9 and len(ids) + len(_skips(out / "failures.jsonl")) == len(inputs)
    # the same files as one process, plus the ranks' provenance; the parts and the run's state are gone
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in reference.iterdir()), "ranks.json"])
    provenance = json.loads((out / "ranks.json").read_text())
    assert provenance["world_size"] == 2 and "k mod world_size" in provenance["rule"]
    assert [(r["rank"], r["inputs"], r["rows"], r["skipped"]) for r in provenance["ranks"]] == [
        (0, 5, 5, {}), (1, 4, 2, {"missing_file": 1, "too_short": 1})]


def test_af_predict_on_two_ranks_equals_one_process(tiny_run, inputs, single_process, tmp_path):
    out = tmp_path / "pred.jsonl"
    argv = [str(tiny_run), *map(str, inputs), "--format", "jsonl", "--windows", "--out", str(out), "--keep-going"]
    _as_torchrun_ranks("af_train.inference.predict", argv, tmp_path / "predict.log")
    lines, expected = out.read_text().splitlines(), single_process["predict"].read_text().splitlines()
    assert [json.loads(line)["file"] for line in lines] == [json.loads(line)["file"] for line in expected]
    assert len(lines) == len(inputs) - 2
    for mine, theirs in zip(map(json.loads, lines), map(json.loads, expected)):
        assert mine.keys() == theirs.keys() and mine["predicted"] == theirs["predicted"]
        np.testing.assert_allclose([mine["logits"][c] for c in theirs["logits"]], list(theirs["logits"].values()),
                                   rtol=0, atol=1e-5)
        assert [w["start_s"] for w in mine["windows"]] == [w["start_s"] for w in theirs["windows"]]
    log = (tmp_path / "predict.log").read_text(errors="replace")
    assert "7 file(s) processed, 2 skipped [missing_file 1, too_short 1]" in log  # rank 0's sum of both parts
    # each rank scored its own part (input k -> rank k mod 2), not one rank all of them
    assert re.search(r"rank 0 on \S+ \(cpu\): 5 inputs, 5 scored, 0 skipped", log), log[-3000:]
    assert re.search(r"rank 1 on \S+ \(cpu\): 4 inputs, 2 scored, 2 skipped", log), log[-3000:]
    assert not Path(f"{out}.parts").exists()
