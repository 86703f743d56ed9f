"""kernels.autotune: the one list of launchers, the bucketed tuning key, the shared-memory prune, recording and
pinning choices."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import triton
from triton.runtime.autotuner import Autotuner

import kernels.rotary_attention as attention
from kernels import autotune

KERNEL_MODULES = ("kernels.rope", "kernels.rotary_attention", "kernels.mpc_loss")


def test_seq_bucket_groups_lengths_by_power_of_two():
    assert [autotune.seq_bucket(n) for n in (1, 16, 17, 500, 512, 513, 752, 1024)] == [
        16, 16, 32, 512, 512, 1024, 1024, 1024]


def test_prune_drops_what_does_not_fit_and_keeps_one():
    configs = [triton.Config({"B": b}) for b in (1, 2, 3)]
    prune = autotune.shared_memory_prune(lambda config, args: config.kwargs["B"] * args["unit"], limit=200)
    assert [c.kwargs["B"] for c in prune(configs, {"unit": 100})] == [1, 2]
    assert [c.kwargs["B"] for c in prune(configs, {"unit": 1000})] == [1]  # none fits: the smallest


def test_attention_prune_keeps_the_model_configs_and_drops_oversized_ones():
    q = torch.empty((2, 752, 12, 64), dtype=torch.bfloat16, device="meta")
    args = {"q_ptr": q, "BLOCK_D": 64, "BLOCK_HALF": 32}
    for configs, estimate in ((attention.FWD_CONFIGS, attention._fwd_shared_bytes),
                              (attention.DKDV_CONFIGS, attention._dkdv_shared_bytes),
                              (attention.DQ_CONFIGS, attention._dq_shared_bytes)):
        assert autotune.shared_memory_prune(estimate)(configs, args) == configs  # D = 64: all fit
        wide = {**args, "BLOCK_D": 1024, "BLOCK_HALF": 512}
        assert len(autotune.shared_memory_prune(estimate)(configs, wide)) == 1


def test_chosen_configs_round_trip_through_json_and_stale_entries_are_returned(monkeypatch):
    tuner = attention._attn_fwd_tuned
    monkeypatch.setattr(tuner, "cache", {})
    key = (1024, 64, True, True, "tf32", True, "torch.bfloat16")
    chosen = attention.FWD_CONFIGS[2]
    tuner.cache[key] = chosen
    recorded = json.loads(json.dumps(autotune.chosen_configs(["attention_fwd"])))
    assert recorded["attention_fwd"][0]["key"] == list(key)
    tuner.cache.clear()
    stale = dict(recorded["attention_fwd"][0], config={**recorded["attention_fwd"][0]["config"], "num_warps": 3})
    skipped = autotune.pin_configs({"attention_fwd": [recorded["attention_fwd"][0], stale],
                                    "gone_kernel": [recorded["attention_fwd"][0]]})
    assert tuner.cache == {key: chosen}  # the same Config object: the tuner launches it without benchmarking
    assert [entry["reason"] for entry in skipped] == ["config not in this version's list", "no such autotuned kernel"]


@pytest.mark.parametrize("name", sorted(autotune.LAUNCHERS))
def test_every_listed_launcher_exists(name):
    launcher = autotune.launcher(name)
    assert isinstance(launcher, Autotuner) == (name in autotune.TUNERS), name
    assert name in autotune.TUNERS or name in autotune.FIXED_CONFIG


def test_the_list_holds_every_autotuner_of_the_kernel_modules():
    """A new triton.autotune object that is not in LAUNCHERS would be missed by the compile report, the
    records, and the tests of the CUDA launch branch."""
    found = {(name, attribute) for name in KERNEL_MODULES
             for attribute, value in vars(importlib.import_module(name)).items() if isinstance(value, Autotuner)}
    assert found == set(autotune.TUNERS.values())
