"""The one list of the kernels' GPU launchers (``LAUNCHERS``, the autotuned ones in ``TUNERS``), and what
the autotuners share: the sequence-length bucket of their keys, the shared-memory prune, and
recording/pinning the configs they chose (so a resumed run launches the same kernels).

Tools and tests reach the launchers through this list (``launcher(name)``; the compile report records
each launch by standing in for the object at ``LAUNCHERS[name]``), never through the kernel modules'
private names.

Recording and pinning, for a training engine (or a benchmark) to call:

- ``chosen_configs()`` -> a JSON-able dict ``{tuner name: [{"key": [...], "config": {...}}, ...]}`` of
  every config the autotuners picked so far in this process (empty before the first CUDA launch);
- ``pin_configs(recorded)`` puts them back into the autotuners' caches: a later launch with the same
  key takes the pinned config without benchmarking. It returns the entries it could not pin (a config
  that is no longer in the tuner's list, or a tuner that no longer exists), for the caller to log.

Rank 0's record, broadcast and pinned on every rank, also makes all ranks run the same kernels (timing
alone can pick different configs on different ranks, which differ in the last bits).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import triton

__all__ = ["LAUNCHERS", "FIXED_CONFIG", "TUNERS", "SHARED_MEMORY_SM90", "launcher", "seq_bucket",
           "shared_memory_prune", "chosen_configs", "pin_configs"]

# Every object the kernels' launch code starts on a GPU: name -> (module, attribute). A fixed table, read
# on demand (the kernel modules import this one). A ``triton.autotune`` object for the autotuned kernels;
# the JIT kernel itself for those that run one fixed config (FIXED_CONFIG).
LAUNCHERS: dict[str, tuple[str, str]] = {
    "rope": ("kernels.rope", "_rotary_kernel_tuned"),
    "attention_fwd": ("kernels.rotary_attention", "_attn_fwd_tuned"),
    "attention_bwd_delta": ("kernels.rotary_attention", "_attn_bwd_delta_kernel"),
    "attention_bwd_dkdv": ("kernels.rotary_attention", "_attn_bwd_dkdv_tuned"),
    "attention_bwd_dq": ("kernels.rotary_attention", "_attn_bwd_dq_tuned"),
    "dropout_keep_mask": ("kernels.rotary_attention", "_keep_mask_kernel"),
    "mpc_fwd": ("kernels.mpc_loss", "_mpc_lse_fwd_tuned"),
    "mpc_bwd": ("kernels.mpc_loss", "_mpc_lse_bwd_tuned"),
}
FIXED_CONFIG: tuple[str, ...] = ("attention_bwd_delta", "dropout_keep_mask")
# The autotuned ones: their names key the recorded choices (chosen_configs, pin_configs).
TUNERS: dict[str, tuple[str, str]] = {name: where for name, where in LAUNCHERS.items() if name not in FIXED_CONFIG}

# Largest dynamic shared memory one block may use on sm_90 (H100/H200): 227 KiB.
SHARED_MEMORY_SM90 = 232448


def seq_bucket(seq_len: int) -> int:
    """The autotuning key of a sequence length: the next power of two (at least 16). With dynamic
    padding every batch has another length; one bucket shares one tuned config."""
    return max(16, triton.next_power_of_2(max(1, int(seq_len))))


def shared_memory_prune(estimate: Callable[[triton.Config, dict], int], limit: int = SHARED_MEMORY_SM90):
    """An ``early_config_prune`` for ``triton.autotune``: drops the configs whose estimated shared memory
    (``estimate(config, named_args)``, bytes) exceeds ``limit``. Keeps the smallest one if none fits, so
    that the tuner can still run (and fail with Triton's own OutOfResources message)."""

    def prune(configs: Sequence[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        sized = [(estimate(config, args), config) for config in configs]
        fitting = [config for size, config in sized if size <= limit]
        return fitting or [min(sized, key=lambda pair: pair[0])[1]]

    return prune


def launcher(name: str):
    """The launch object of ``LAUNCHERS[name]``: a ``triton.autotune`` object (``TUNERS``), or a JIT kernel."""
    module_name, attribute = LAUNCHERS[name]
    return getattr(importlib.import_module(module_name), attribute)


def _config_dict(config: triton.Config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": config.num_ctas, "maxnreg": config.maxnreg}


def chosen_configs(names: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Every config the autotuners chose so far, as JSON-able data for ``pin_configs``."""
    recorded: dict[str, list[dict]] = {}
    for name in TUNERS if names is None else names:
        cache = getattr(launcher(name), "cache", None) or {}
        recorded[name] = [{"key": list(key), "config": _config_dict(config)} for key, config in cache.items()]
    return recorded


def pin_configs(recorded: dict[str, list[dict]]) -> list[dict]:
    """Put recorded choices (``chosen_configs`` output, e.g. read back from a checkpoint) into the
    autotuners' caches. Returns the entries that were not pinned, each with a ``reason``."""
    skipped: list[dict] = []
    for name, entries in recorded.items():
        if name not in TUNERS:
            skipped += [{**entry, "tuner": name, "reason": "no such autotuned kernel"} for entry in entries]
            continue
        tuner = launcher(name)
        if not hasattr(tuner, "cache"):  # interpreter mode: no autotuner, nothing to pin
            skipped += [{**entry, "tuner": name, "reason": "kernels are interpreted"} for entry in entries]
            continue
        by_value = {repr(_config_dict(config)): config for config in tuner.configs}
        for entry in entries:
            config = by_value.get(repr(entry["config"]))
            if config is None:
                skipped.append({**entry, "tuner": name, "reason": "config not in this version's list"})
                continue
            tuner.cache[tuple(entry["key"])] = config
    return skipped
