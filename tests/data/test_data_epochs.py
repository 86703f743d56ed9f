"""The training loaders give the same global batches at 1, 2 and 4 ranks over several epochs (issue 21).

Real spawned ranks (gloo, the deepspeed launcher's environment) read the training split as the
engine does: ``accumulation`` micro batches per step, a new epoch when the loader ends. The global
batch is 8 everywhere, split as 1 rank x 2 accumulation x 4, 2 ranks x 1 x 4, 2 ranks x 2 x 2 with 2
DataLoader workers, and 4 ranks x 1 x 2. The split has 45 clips (not a multiple of 8, nor of 4
ranks) over 2 canonical nodes, so every epoch ends with a partial global batch that streaming pads
differently per layout. Each step must read the same clips with the same (masked) token rows at every
layout, across three or more epoch boundaries, layouts with the same micro batch the same micro
batches, and a resume at another world size (1 -> 2 and 2 -> 4 ranks) must continue the uninterrupted
sequence across two or more. The same holds for a mixture of two data sets (one with ``choose``) and
for class-balanced sampling (rarity buckets, fractional ``repeat``).
"""

from __future__ import annotations

import pytest
import torch
from af_train_tools.synthetic_shards import write_random_shards
from data_rank_worker import read_steps, spawn_ranks

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 8
STEPS = 22  # epochs begin at steps 1, 6, 11, 16, 21 (45 clips); 1, 8, 15, 22 (mixture: 45 + 13 clips)
RESUME_AT = 7  # the state after step 7 (second epoch), resumed at another world size


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, dict]:
    """{layout: {data set: global steps}}: 1 rank first, then 2 ranks (also resuming 1 rank's states),
    then 4 ranks (also resuming 2 ranks' states)."""
    root = tmp_path_factory.mktemp("epochs")
    write_random_shards(root / "a", 45, frames=12, num_classes=4, multi_label=False, seed=8, size_limit=1 << 11)
    write_random_shards(root / "b", 20, frames=12, num_classes=4, multi_label=False, seed=9, size_limit=1 << 11,
                 labels_per_clip=[[i % 4] for i in range(20)])
    common = {"max_length": 10, "num_canonical_nodes": 2, "shuffle_seed": 3, "code_rows": [0]}
    data = {
        "plain": {"train": str(root / "a"), **common},
        "mixture": {"train": [{"path": str(root / "a")}, {"path": str(root / "b"), "choose": 13}], **common},
        "balanced": {"train": str(root / "a"), "balanced_sampling": True, "balance_buckets": 3, **common},
    }
    from af_train.config import StreamConfig

    data["mixture"]["train"] = [StreamConfig(**entry) for entry in data["mixture"]["train"]]

    def scenarios(micro: int, resume_from: list[dict] | None = None, workers: int = 0) -> list[dict]:
        """Every data set read from the start and, given another layout's results, resumed from its states."""
        runs = [(name, cfg, None) for name, cfg in data.items()]
        if resume_from is not None:
            runs += [(f"{name} resumed", data[name], resume_from[0][name]["state"]) for name in data]
        return [{"name": name + (" workers" if workers else ""), "data": {**cfg, "num_workers": workers},
                 "micro": micro, "global_batch": GLOBAL_BATCH, "steps": STEPS if state is None else STEPS - RESUME_AT,
                 "capture_at": RESUME_AT, "cache": str(root / "cache"), "resume": state} for name, cfg, state in runs]

    def run(world: int, plan: list[dict]) -> list[dict]:
        out = root / f"ranks{world}"
        out.mkdir()
        spawn_ranks(read_steps, world, plan, str(out), timeout=240)
        return [torch.load(out / f"steps{rank}.pt", weights_only=False) for rank in range(world)]

    one = run(1, scenarios(4))  # 1 rank x 2 accumulation steps x micro batch 4
    # 2 ranks x micro batch 4, from the start and resumed from 1 rank's states; and 2 ranks x 2 x 2 with workers
    two = run(2, scenarios(4, resume_from=one) + scenarios(2, workers=2)[:1])
    four = run(4, scenarios(2, resume_from=two))  # 4 ranks x micro batch 2, and resumed from 2 ranks' states
    layouts = {"1x2x4": (one, ""), "2x1x4": (two, ""), "1->2 ranks": (two, " resumed"),
               "2x2x2 workers": (two, " workers"), "4x1x2": (four, ""), "2->4 ranks": (four, " resumed")}
    return {key: {name: (_global_steps(ranks, name + suffix), _micro_batches(ranks, name + suffix))
                  for name in data if name + suffix in ranks[0]} for key, (ranks, suffix) in layouts.items()}


def _micro_batches(ranks: list[dict], name: str) -> dict[tuple[int, int], list]:
    """{(step, slot): the micro batch's samples in order}; rank r of D fills slot r + D x accumulation step."""
    accumulation, out = ranks[0][name]["accumulation"], {}
    for rank, result in enumerate(ranks):
        for c, batch in enumerate(result[name]["batches"]):
            step, accumulation_step = divmod(c, accumulation)
            out[(step, rank + len(ranks) * accumulation_step)] = batch["samples"]
    return out


def _global_steps(ranks: list[dict], name: str) -> list[tuple[list[int], list]]:
    """Per step: the epochs its micro batches came from, and its samples sorted (any rank, any order)."""
    per_rank = [r[name]["batches"] for r in ranks]
    accumulation = ranks[0][name]["accumulation"]
    assert len({len(b) for b in per_rank}) == 1, "ranks read different numbers of micro batches"
    steps = []
    for k in range(len(per_rank[0]) // accumulation):
        parts = [b for batches in per_rank for b in batches[k * accumulation:(k + 1) * accumulation]]
        steps.append((sorted({p["epoch"] for p in parts}), sorted(s for p in parts for s in p["samples"])))
    return steps


@pytest.mark.parametrize("scenario", ["plain", "mixture", "balanced"])
def test_every_layout_reads_the_same_global_batches_across_epochs(layouts, scenario):
    reference, _ = layouts["1x2x4"][scenario]
    assert len(reference) == STEPS
    assert all(len(samples) == GLOBAL_BATCH for _, samples in reference)
    assert all(len(epochs) == 1 for epochs, _ in reference), "a step mixed two epochs"
    if scenario == "plain":  # 45 clips: 5 whole global batches an epoch, 5 clips left out
        assert [epochs[0] for epochs, _ in reference] == [k // 5 for k in range(STEPS)]
    for key in ("2x1x4", "2x2x2 workers", "4x1x2"):
        if scenario not in layouts[key]:
            continue  # DataLoader workers: read for the plain split only
        steps, _ = layouts[key][scenario]
        for k, (mine, theirs) in enumerate(zip(steps, reference)):
            assert mine == theirs, f"{key}: step {k + 1} differs from 1 rank x 2 accumulation steps"


@pytest.mark.parametrize(("layout", "same_micro_batches_as"), [("2x1x4", "1x2x4"), ("4x1x2", "2x2x2 workers")])
def test_layouts_with_the_same_micro_batch_read_the_same_micro_batches(layouts, layout, same_micro_batches_as):
    """Not only the global batch: each micro batch (step, slot) holds the same clips in the same order."""
    _, mine = layouts[layout]["plain"]
    _, theirs = layouts[same_micro_batches_as]["plain"]
    assert len(mine) == STEPS * GLOBAL_BATCH // len(next(iter(mine.values())))
    assert mine == theirs


@pytest.mark.parametrize("scenario", ["plain", "mixture", "balanced"])
def test_resume_at_another_world_size_continues_the_uninterrupted_sequence(layouts, scenario):
    reference, _ = layouts["1x2x4"][scenario]
    for key in ("1->2 ranks", "2->4 ranks"):
        resumed, _ = layouts[key][scenario]
        assert len(resumed) == STEPS - RESUME_AT
        for k, (mine, theirs) in enumerate(zip(resumed, reference[RESUME_AT:])):
            # epochs count from the resumed one
            assert mine[1] == theirs[1], f"{key}: step {RESUME_AT + k + 1} differs from the uninterrupted run"
