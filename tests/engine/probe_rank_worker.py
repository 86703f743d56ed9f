"""Body of one simulated rank for the train.probe tests (imported by spawned processes)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any


def probe_once(data_root: str, batch_size: int) -> dict[str, Any]:
    """``Prober``s built as the engine builds them, run once per kind on a seeded tiny encoder (in this
    process's process group, if any): ``{kind: {"metrics": ..., "features": {split: {layer: [N, hidden]}}}}``;
    the linear probe chooses its layer on val (``layer: best``)."""
    import torch

    from af_train.config import DataConfig, ProbeConfig
    from af_train.model import AudioFormerConfig, RoFormerEncoder
    from af_train.probe import Prober
    from af_train.shards import Manifest

    torch.manual_seed(0)
    encoder = RoFormerEncoder(AudioFormerConfig.preset("tiny"))
    manifest = Manifest.load(Path(data_root) / "train")
    out = {}
    for kind, layer in (("knn", None), ("linear", "best")):
        cfg = ProbeConfig(dataset=data_root, every=1, max_clips=21, kind=kind, layer=layer, batch_size=batch_size)
        prober = Prober(cfg, DataConfig(code_rows=[0], max_length=32), manifest, encoder.config.num_hidden_layers,
                        torch.device("cpu"))
        out[kind] = {"metrics": prober.run(encoder, step=0), "features": prober.features(encoder)}
    return out


def run_rank(rank: int, world_size: int, port: int, data_root: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = probe_once(data_root, batch_size=4)
        (Path(out_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()
