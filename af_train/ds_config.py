"""The DeepSpeed config, generated from the recipe (no hand-kept JSON that drifts from it).

``build_ds_config`` maps the ``train``/``optim`` sections onto DeepSpeed's keys, then merges the
recipe's free-form ``deepspeed:`` section on top: new keys are added, a key that the recipe already
decides with a different value is an error naming both values and the recipe key to change instead.
The learning-rate schedule is ours (``af_train.schedule``), so a ``scheduler`` entry is refused.

Also the rest of the DeepSpeed glue the Trainer uses: ``init_process`` (process group, rank, device),
``initialize_engine``, the ZeRO-0 fp32 overflow check, the CPU all-reduce buffer clean-up and
``StopSignals`` (SIGTERM/SIGINT become a request to save and stop).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import signal
from dataclasses import dataclass
from typing import Any

import torch

from af_train.config import Recipe, RecipeError

log = logging.getLogger("af_train.engine")

# DeepSpeed key (dotted) -> the recipe key that decides it, for conflict messages.
RECIPE_KEY_OF = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "train_batch_size": "train.global_batch_size (micro x accumulation x world size)",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "zero_optimization.offload_optimizer.device": "train.offload_optimizer",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "optimizer.type": "(AdamW is fixed by af_train)",
    "optimizer.params.lr": "optim.lr",
    "optimizer.params.betas": "optim.betas",
    "optimizer.params.eps": "optim.eps",
    "optimizer.params.weight_decay": "optim.weight_decay",
}


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch is made: ``global_batch = micro_batch × grad_accum × world_size``."""

    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} = micro batch {self.micro_batch} x gradient accumulation "
            f"{self.grad_accum} x world size {self.world_size}"
        )


def plan_batch(recipe: Recipe, world_size: int, keep_global_batch: int | None = None) -> BatchPlan:
    """Check the recipe's batch numbers against the world size.

    ``keep_global_batch`` (resuming at another world size) keeps that global batch and derives the
    accumulation steps from it, so the optimisation continues with the same batches.
    """
    train = recipe.train
    micro = train.micro_batch_size
    if keep_global_batch is not None:
        per_step = micro * world_size
        if keep_global_batch % per_step:
            raise RecipeError(
                f"cannot keep the checkpoint's global batch {keep_global_batch} at world size {world_size} with "
                f"train.micro_batch_size={micro}: {keep_global_batch} is not a multiple of {micro} x {world_size}; "
                "choose a micro batch size (or world size) that divides it"
            )
        return BatchPlan(micro, keep_global_batch // per_step, world_size)
    plan = BatchPlan(micro, train.grad_accum_steps, world_size)
    if train.global_batch_size is not None and train.global_batch_size != plan.global_batch:
        raise RecipeError(
            f"train.global_batch_size={train.global_batch_size} does not equal train.micro_batch_size={micro} x "
            f"train.grad_accum_steps={train.grad_accum_steps} x world size {world_size} = {plan.global_batch}; "
            "change one of them (or drop train.global_batch_size to accept the product)"
        )
    return plan


def build_ds_config(
    recipe: Recipe,
    plan: BatchPlan,
    *,
    on_cpu: bool,
    fp16_supported: bool = True,
    load_universal: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config dict for ``recipe`` with batch ``plan`` (see the module docstring)."""
    train, optim = recipe.train, recipe.optim
    optimizer_params: dict[str, Any] = {
        "lr": optim.lr,
        "betas": list(optim.betas),
        "eps": optim.eps,
        "weight_decay": optim.weight_decay,  # groups without decay override it with 0 (see engine)
    }
    if on_cpu and not train.offload_optimizer:
        optimizer_params["torch_adam"] = True  # DeepSpeed's FusedAdam is CUDA-only
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu}
    config: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "steps_per_print": 2**31 - 1,  # af_train logs itself
        "wall_clock_breakdown": False,
    }
    if train.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        if not fp16_supported:
            raise RecipeError(
                "train.precision=fp16 is not supported on this device (DeepSpeed's CPU accelerator has no "
                "fp16 kernels here); use train.precision=bf16 or fp32"
            )
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1}
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    if "scheduler" in recipe.deepspeed:
        raise RecipeError(
            "deepspeed.scheduler is not allowed: the learning-rate schedule comes from optim.schedule, "
            "optim.warmup_steps and optim.min_lr_ratio"
        )
    return merge_user_config(config, recipe.deepspeed)


def merge_user_config(generated: dict[str, Any], user: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``generated`` with ``user`` merged in; a differing value for a generated key is an error."""
    merged = copy.deepcopy(generated)
    for key, value in user.items():
        dotted = f"{prefix}{key}"
        if key not in merged:
            merged[key] = copy.deepcopy(value)
        elif isinstance(merged[key], dict) and isinstance(value, dict):
            merged[key] = merge_user_config(merged[key], value, prefix=f"{dotted}.")
        elif not _same(merged[key], value):
            source = RECIPE_KEY_OF.get(dotted, "the recipe")
            raise RecipeError(
                f"deepspeed.{dotted}={value!r} conflicts with {merged[key]!r} set from {source}; "
                "set it there instead of in the deepspeed section"
            )
    return merged


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and normalisation weights (all 1-D tensors) get no weight decay."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def optimizer_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable (requires_grad) parameters: decay and no decay."""
    decay, plain = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue  # frozen FT2 row encoders stay out of the optimizer
        (plain if no_decay(name, param) else decay).append(param)
    if not decay and not plain:
        raise ValueError("the training module has no trainable parameters (all requires_grad=False)")
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


# --------------------------------------------------------------------------------------------------
# What DeepSpeed leaves to us
# --------------------------------------------------------------------------------------------------


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
    from af_train.checkpoint import barrier

    barrier()  # every rank is past its last collective
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
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from af_train.data.dataset import setup_distributed_env
    from af_train.run_logging import setup_logging

    setup_distributed_env()
    accelerator = get_accelerator()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    setup_logging(rank)
    on_cpu = accelerator.device_name() == "cpu"
    local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if on_cpu and local_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        # N ranks x all cores each would oversubscribe the CPU many times over
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    device = torch.device("cpu") if on_cpu else torch.device(accelerator.device_name(local_rank))
    if not on_cpu:
        accelerator.set_device(local_rank)
    return Placement(rank, world_size, local_rank, device, on_cpu, accelerator.is_fp16_supported())


def initialize_engine(recipe: Recipe, module: torch.nn.Module, ds_config: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(DeepSpeed engine, optimizer, lr scheduler) for ``module``: AdamW groups, our lr schedule, and
    the overflow check DeepSpeed lacks for ZeRO-0 fp32."""
    import deepspeed

    from af_train.optim_groups import parameter_groups
    from af_train.schedule import build_lr_scheduler

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
