"""Process start-up for training: what DeepSpeed leaves to us.

``init_process`` (process group, rank, device, log format), ``initialize_engine`` (DeepSpeed engine,
AdamW parameter groups, our lr schedule), the overflow check DeepSpeed lacks for ZeRO-0 fp32,
``StopSignals`` (SIGTERM/SIGINT become a request to save and stop) and the clean-up of DeepSpeed's
CPU all-reduce buffer. The DeepSpeed config itself comes from ``af_train.ds_config``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
from dataclasses import dataclass
from typing import Any

import torch

from af_train import distributed
from af_train.config import Recipe
from af_train.optim_groups import parameter_groups
from af_train.run_logging import setup_logging
from af_train.schedule import build_lr_scheduler

log = logging.getLogger(__name__)


def guard_plain_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """ZeRO-0 fp32: DeepSpeed steps a plain torch optimizer without an overflow check; add one.

    The engine reads ``optimizer.overflow`` after ``step()``: True counts a skipped step and leaves
    the lr schedule where it is. Gradients are all-reduced before ``step()``, so every rank agrees.
    """
    original_step = optimizer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) \
            if grads else torch.tensor(0.0)
        optimizer._global_grad_norm = float(norm)
        optimizer.overflow = not math.isfinite(float(norm))
        optimizer._opt_called = True  # what torch's lr scheduler checks (it wrapped the original step)
        if optimizer.overflow:
            return None
        return original_step(*args, **kwargs)

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.overflow = False
    optimizer.step = step


def release_cpu_allreduce_buffer(rank: int) -> None:
    """Collective: unlink this rank's ~66 MB /dev/shm buffer of DeepSpeed's CPU all-reduce (never removed)."""
    distributed.barrier()  # every rank is past its last collective
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    with contextlib.suppress(OSError):
        os.unlink(f"/dev/shm/{name}")


@dataclass
class Placement:
    """Where this process trains: its rank among ``world_size`` and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    on_cpu: bool
    fp16_supported: bool


def init_process() -> Placement:
    """Start DeepSpeed's process group (gloo on CPU) and pick this rank's device.

    CPU ranks on one machine share its cores (unless OMP_NUM_THREADS says otherwise), and the run's
    log lines name their rank (INFO on rank 0, warnings elsewhere).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from af_train.data.dataset import setup_distributed_env

    setup_distributed_env()
    accelerator = get_accelerator()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    rank, world_size = distributed.rank(), distributed.world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    setup_logging(rank)
    on_cpu = accelerator.device_name() == "cpu"
    local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if on_cpu and local_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(distributed.cores_per_rank(local_size))
    device = torch.device("cpu") if on_cpu else torch.device(accelerator.device_name(local_rank))
    if not on_cpu:
        accelerator.set_device(local_rank)
    return Placement(rank, world_size, local_rank, device, on_cpu, accelerator.is_fp16_supported())


def initialize_engine(recipe: Recipe, module: torch.nn.Module, ds_config: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(DeepSpeed engine, optimizer, lr scheduler) for ``module``: AdamW groups, our lr schedule, and
    the overflow check DeepSpeed lacks for ZeRO-0 fp32."""
    import deepspeed

    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=module, model_parameters=parameter_groups(module, recipe.optim), config=ds_config,
        lr_scheduler=lambda opt: build_lr_scheduler(opt, recipe.optim, recipe.train.max_steps),
    )
    if recipe.train.zero_stage == 0 and recipe.train.precision == "fp32":
        guard_plain_optimizer(engine.optimizer)
    return engine, optimizer, lr_scheduler


class StopSignals:
    """Between ``install`` and ``restore``, SIGTERM/SIGINT only record themselves in ``received``; the
    Trainer's ranks agree on it after the step, save a checkpoint and stop."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        def request_stop(signum: int, frame: Any) -> None:
            if self.received is None:
                log.warning("received %s: saving a checkpoint after this step", signal_name(signum))
            self.received = signum

        self._previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in self._previous:
            signal.signal(sig, request_stop)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def signal_name(signum: int | None) -> str:
    try:
        return signal.Signals(signum).name if signum is not None else "signal"
    except ValueError:
        return f"signal {signum}"
