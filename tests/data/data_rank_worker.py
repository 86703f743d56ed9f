"""Body of one simulated rank for the multi-rank data tests (imported by spawned processes)."""

from __future__ import annotations

import os
from typing import Any

import torch


def _record(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in ("ids", "input_ids", "attention_mask", "mlm_labels", "labels")}


def run_rank(
    rank: int,
    world_size: int,
    port: int,
    shard_dir: str,
    out_dir: str,
    batch_size: int,
    resume_after: int | None,
    resume_state: dict[str, Any] | None,
) -> None:
    """Read one epoch on this rank; optionally capture the loader state after ``resume_after`` batches;
    then, from ``resume_state`` (or the captured state) build a fresh loader, resume and read the rest.
    Everything seen is saved to ``out_dir/rank{rank}.pt``."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_SIZE=str(world_size),  # as the deepspeed launcher sets it; af_train.data maps it
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    torch.set_num_threads(1)
    import torch.distributed as dist

    from af_train.config import DataConfig
    from af_train.data.loader import build_dataloader

    if world_size > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    cfg = DataConfig(train=shard_dir, code_rows=[0, 1], max_length=24, num_canonical_nodes=2, shuffle_seed=7)
    result: dict[str, Any] = {"epoch": [], "state": None, "resumed": []}

    loader = build_dataloader(cfg, "train", batch_size, mask=True, seed=11)
    for step, batch in enumerate(loader):
        result["epoch"].append(_record(batch))
        if resume_after is not None and step + 1 == resume_after:
            result["state"] = loader.state_dict()
    if world_size > 1:
        dist.barrier()
    loader.dataset.close()

    state = resume_state if resume_state is not None else result["state"]
    if state is not None:
        loader = build_dataloader(cfg, "train", batch_size, mask=True, seed=11)
        loader.load_state_dict(state)
        result["resumed"] = [_record(batch) for batch in loader]
        if world_size > 1:
            dist.barrier()
        loader.dataset.close()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if world_size > 1:
        dist.destroy_process_group()
