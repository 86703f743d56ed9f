"""The DeepSpeed config, generated from the recipe (no hand-kept JSON that drifts from it).

``build_ds_config`` maps the ``train``/``optim`` sections onto DeepSpeed's keys, then merges the
recipe's free-form ``deepspeed:`` section on top: new keys are added, a key that the recipe already
decides with a different value is an error naming both values and the recipe key to change instead.
The learning-rate schedule is ours (``af_train.schedule``), so a ``scheduler`` entry is refused.

A pure function of the recipe and the batch plan: starting the process and DeepSpeed's engine is
``af_train.runtime``'s job, the optimizer's parameter groups ``af_train.optim_groups``'.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from af_train.config import Recipe, RecipeError

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
        "weight_decay": optim.weight_decay,  # groups without decay override it with 0 (optim_groups)
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
