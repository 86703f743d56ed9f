"""Every collective af_train runs, and the one "is a process group up?" check.

Each function is also correct in a single process without a process group (evaluation CLI, unit
tests): a collective then acts on this process alone. Functions documented as collective must be
called by every rank, in the same order.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchPlacement:
    """Where a launcher put this process, read from its environment before any process group exists."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # "torch" (deepspeed / torchrun: RANK, WORLD_SIZE), "slurm" (srun), "mpi" or "none"


# (launcher, rank, world size, local rank, local world size): the first launcher whose rank variable is set wins
_LAUNCH_VARIABLES = (
    ("torch", "RANK", "WORLD_SIZE", "LOCAL_RANK", ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", ("SLURM_NTASKS_PER_NODE",)),
    ("mpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     ("OMPI_COMM_WORLD_LOCAL_SIZE",)),
)


def cores_per_rank(local_world_size: int) -> int:
    """This rank's share of the machine's CPU cores (at least 1): N local ranks with all cores each would
    oversubscribe it N times, and torch's intra-op threads then spin against each other."""
    return max(1, (os.cpu_count() or 1) // max(1, local_world_size))


def launch_placement(environ: Mapping[str, str] | None = None) -> LaunchPlacement:
    """This process's rank, world size and local rank as its launcher set them (deepspeed and torchrun
    export RANK/WORLD_SIZE/LOCAL_RANK, SLURM's srun SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, Open MPI
    OMPI_COMM_WORLD_*); rank 0 of 1 without a launcher. The one place rank and world come from the
    environment for jobs that are not DeepSpeed engines (af-prepare)."""
    env = os.environ if environ is None else environ
    for launcher, rank_key, world_key, local_key, local_size_keys in _LAUNCH_VARIABLES:
        if rank_key in env:
            world = int(env.get(world_key, "1"))
            local_size = next((env[k] for k in local_size_keys if k in env), None)
            # SLURM_NTASKS_PER_NODE may read "4(x2)" on heterogeneous allocations: the leading number
            local_world = int(str(local_size).split("(")[0]) if local_size else 1
            placement = LaunchPlacement(int(env[rank_key]), world, int(env.get(local_key, "0")), local_world,
                                        launcher)
            if not 0 <= placement.rank < placement.world_size:
                raise ValueError(f"{rank_key}={placement.rank} is outside {world_key}={placement.world_size}")
            return placement
    return LaunchPlacement(0, 1, 0, 1, "none")


def init_from_environment(placement: LaunchPlacement, timeout_s: float) -> None:
    """Join the gloo process group of a launched job (MASTER_ADDR / MASTER_PORT from the environment),
    unless there is only one rank or a group is already up. ``timeout_s`` bounds every collective:
    a job whose ranks wait for each other's long work sets it above that work's duration."""
    if placement.world_size == 1 or is_distributed():
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"{placement.world_size} ranks ({placement.launcher} launcher) but {', '.join(missing)} "
                         "not set: export the address and a free port of the rank-0 host on every rank")
    dist.init_process_group("gloo", rank=placement.rank, world_size=placement.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def shutdown() -> None:
    """Leave the process group (if one is up); after this, collectives act on this process alone."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True when a process group is initialised (a launcher started this rank, or ``init_process`` ran)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Ranks in the process group; 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def backend() -> str:
    """The process group's communication backend (nccl, gloo, ...); "none" without one."""
    return str(dist.get_backend()) if is_distributed() else "none"


def barrier() -> None:
    """Collective: wait until every rank got here."""
    if is_distributed():
        dist.barrier()


def barrier_unless_broken() -> None:
    """Collective: like ``barrier``, but returns at once when a rank is already gone (killed, lost): its
    connection closed, there is nobody left to wait for."""
    if is_distributed():
        with contextlib.suppress(RuntimeError):  # gloo / NCCL: a peer closed its connection
            dist.barrier()


@contextlib.contextmanager
def ranks_leave_together(world_size: int) -> Iterator[None]:
    """Collective: every rank waits at the end of the block until all got there (also when one raised), e.g.
    while rank 0 alone merges every rank's part and the others have returned. No-op for one rank (a process
    group its caller holds is left alone).

    Why: a rank that exited while rank 0 still worked was seen to abort in the process group's teardown
    (gloo: "terminate called without an active exception", 1 run in 6), and its launcher then killed rank 0
    in the middle of the merge."""
    try:
        yield
    finally:
        if world_size > 1:
            barrier_unless_broken()


def broadcast_from_rank0(value: Any) -> Any:
    """Collective: rank 0's ``value`` on every rank (the others' ``value`` is ignored). An exception
    there (see ``result_or_exception``) is raised on every rank, so all of them stop together."""
    box = [value]
    if is_distributed():
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def result_or_exception(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or the exception it raised: what rank 0 hands to ``broadcast_from_rank0``."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - raised on every rank by broadcast_from_rank0
        return exc


def gather_objects(obj: Any) -> list[Any]:
    """Collective: every rank's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
    if world_size() > 1:
        out: list[Any] = [None] * world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def sum_over_ranks(values: dict[str, Any], device: torch.device) -> dict[str, float]:
    """Collective: each named scalar (number or 0-d tensor) summed over every rank in one float64
    all-reduce on ``device``. Every rank must pass the same names in the same order."""
    if not values:
        return {}
    packed = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values.values()])
    if is_distributed():
        dist.all_reduce(packed)
    return dict(zip(values, packed.tolist()))


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order; backward sums the gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, sizes: list[int], start: int) -> torch.Tensor:
        padded = local.new_zeros((max(sizes), *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.start, ctx.size = start, local.shape[0]
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # Every rank's loss reaches every gathered row: a row's gradient is the sum over the ranks'
        # losses, returned to its owner only (the other ranks' copies are not parameters' inputs).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start: ctx.start + ctx.size], None, None


def gather_rows(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Collective: (the rows of ``local`` [n_r, ...] of every rank, concatenated in rank order; the
    index of this rank's first row). Differentiable; the identity with one rank. Ranks may hold
    different numbers of rows."""
    if world_size() == 1:
        return local, 0
    me = dist.get_rank()
    sizes = torch.zeros(dist.get_world_size(), dtype=torch.long, device=local.device)
    sizes[me] = local.shape[0]
    dist.all_reduce(sizes)
    counts = sizes.tolist()
    start = sum(counts[:me])
    return _GatherRows.apply(local, counts, start), start
