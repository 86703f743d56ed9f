"""Body of one simulated rank for the multi-rank data tests (imported by spawned processes)."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
from collections.abc import Callable
from typing import Any

import torch


def spawn_ranks(target: Callable[..., None], world_size: int, *args: Any, timeout: float = 120) -> None:
    """Run ``target(rank, world_size, port, *args)`` in ``world_size`` spawned processes; all must exit 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, world_size, port, *args)) for rank in range(world_size)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=timeout)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    codes = [proc.exitcode for proc in procs]
    assert codes == [0] * world_size, f"rank processes exited with {codes}"


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
    _rank_env(rank, world_size, port)
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


def read_steps(rank: int, world_size: int, port: int, scenarios: list[dict[str, Any]], out_dir: str) -> None:
    """Read each scenario's loader as the engine does (``accumulation`` micro batches per step, a new
    epoch on StopIteration) for ``steps`` steps, from ``resume`` (a loader state) if given; record per
    micro batch the epoch and (clip id, checksum of its token rows) of every sample, and the loader
    state after ``capture_at`` steps. Saved to ``out_dir/steps{rank}.pt``: {scenario name: result}."""
    import zlib

    _rank_env(rank, world_size, port)
    import torch.distributed as dist

    from af_train.config import DataConfig
    from af_train.data.loader import build_dataloader
    from af_train.distributed import barrier

    if world_size > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results: dict[str, Any] = {}
    for scenario in scenarios:
        cfg = DataConfig(**scenario["data"])
        micro, global_batch = scenario["micro"], scenario["global_batch"]
        loader = build_dataloader(cfg, "train", micro, mask=True, seed=11, local_cache=scenario.get("cache"),
                                  global_batch=global_batch)
        if scenario.get("resume") is not None:
            loader.load_state_dict(scenario["resume"])
        accumulation = global_batch // (micro * world_size)
        batches, state, epoch, iterator = [], None, 0, iter(loader)
        while len(batches) < scenario["steps"] * accumulation:
            try:
                batch = next(iterator)
            except StopIteration:
                epoch, iterator = epoch + 1, iter(loader)
                continue
            rows = [zlib.crc32(row.numpy().tobytes()) for row in batch["input_ids"]]
            batches.append({"epoch": epoch, "samples": list(zip(batch["ids"], rows))})
            if len(batches) == scenario.get("capture_at", -1) * accumulation:
                state = loader.state_dict()
        del iterator
        barrier()
        loader.dataset.close()
        results[scenario["name"]] = {"batches": batches, "state": state, "accumulation": accumulation}
    torch.save(results, os.path.join(out_dir, f"steps{rank}.pt"))
    if world_size > 1:
        dist.destroy_process_group()


def _rank_env(rank: int, world_size: int, port: int) -> None:
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
    # DataLoader workers fork, as under the deepspeed launcher (a spawned rank would spawn them, each
    # importing torch again every epoch)
    mp.set_start_method("fork", force=True)
