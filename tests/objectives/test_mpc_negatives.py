"""FT2 with global MPC negatives on 2 gloo ranks equals one process over the same global batch.

Each rank holds half the clips of a global micro batch; with ``mpc_negatives=global`` its anchors are
contrasted with every rank's embeddings (gathered with their gradients). Summed as the engine sums
them (each term / its global count), the 2-rank loss must equal the single-process loss over all
clips, and the summed gradients must equal the float64 single-process gradient: a gradient that
does not return to its owner, or returns twice, fails. ``mpc_n`` must be global clips x rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = r'''
import json, os, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from af_train.model import AudioFormerConfig, RoFormerEncoder
from af_train.objectives import FineTuneModule

CLIPS, ROWS, SEQ, CLASSES = 6, 3, 10, 5


def build():
    torch.manual_seed(0)
    config = AudioFormerConfig.preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    frozen = [RoFormerEncoder(config, "reference") for _ in range(ROWS - 1)]
    module = FineTuneModule(RoFormerEncoder(config, "reference"), CLASSES, True, list(range(ROWS)), frozen,
                            alpha=0.6, temperature=0.1, mpc_negatives="global")
    return module.double().train()


def batch(lo, hi):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1024, (CLIPS, ROWS, SEQ), generator=gen)
    mask = torch.ones(CLIPS, SEQ, dtype=torch.long)
    mask[1, 6:] = 0
    mask[4, 3:] = 0
    labels = (torch.rand(CLIPS, CLASSES, generator=gen) < 0.4).double()
    return {"input_ids": ids[lo:hi], "attention_mask": mask[lo:hi], "labels": labels[lo:hi]}


def terms_loss(module, b, counts):
    out = module(b)
    loss = sum(t.weight * t.total / counts[t.count_key] for t in out["terms"].values() if t.weight)
    return out, loss


def worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    module = build()
    per = CLIPS // world
    b = batch(rank * per, (rank + 1) * per)
    out, loss = terms_loss(module, b, {"clips": float(CLIPS)})
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    dist.all_reduce(grads)  # the engine's data-parallel reduction (DeepSpeed's average x world size)
    total = loss.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total, "grads": grads, "mpc_n": float(out["logs"]["mpc_n"])}, f"{out_dir}/dist.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    out_dir, port = sys.argv[1], int(sys.argv[2])
    mp.spawn(worker, args=(2, port, out_dir), nprocs=2, join=True)
    module = build()  # one process, the whole global batch, local negatives = every clip
    module.mpc_negatives = "local"
    out, loss = terms_loss(module, batch(0, CLIPS), {"clips": float(CLIPS)})
    assert torch.allclose(loss, out["loss"].double(), rtol=1e-12), (loss, out["loss"])  # terms == the mean loss
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    dist_result = torch.load(f"{out_dir}/dist.pt")
    print(json.dumps({
        "loss": [float(dist_result["loss"]), float(loss)],
        "grad_diff": float((dist_result["grads"] - grads).abs().max()), "grad_scale": float(grads.abs().max()),
        "mpc_n": [dist_result["mpc_n"], float(out["logs"]["mpc_n"])], "mpc_loss": float(out["logs"]["mpc_loss"]),
    }))
'''


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_global_negatives_on_two_ranks_equal_one_process_over_the_global_batch(tmp_path):
    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(tmp_path), str(_free_port())], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    two_ranks, one_process = result["loss"]
    assert result["mpc_loss"] > 0.1  # the contrastive term is not trivially zero
    # float tolerance: the classification term is computed in float32 (scores.float()), the MPC in float64
    assert abs(two_ranks - one_process) <= 1e-6 * abs(one_process), result
    assert result["grad_scale"] > 0 and result["grad_diff"] <= 1e-10 * result["grad_scale"], result
    assert result["mpc_n"] == [6 * 3, 6 * 3]  # global micro batch x rows, on every rank
