"""Multi-rank reading: disjoint complete partitions and mid-epoch resume at 2 -> 2 and 2 -> 1 ranks.

Ranks are real processes (spawned), coordinated through gloo, with the environment the deepspeed
launcher gives (LOCAL_SIZE, not LOCAL_WORLD_SIZE).
"""

from __future__ import annotations

import pytest
import torch
from af_train_tools.synthetic_shards import write_random_shards
from data_rank_worker import run_rank, spawn_ranks

pytestmark = pytest.mark.slow

NUM_CLIPS = 48
PER_RANK_BATCH = 4
RESUME_AFTER = 2  # batches per rank before the checkpoint (of 6 in the epoch)
TENSOR_KEYS = ("input_ids", "attention_mask", "mlm_labels", "labels")


def _launch(world_size, shard_dir, out_dir, batch_size, resume_after=None, resume_state=None):
    spawn_ranks(run_rank, world_size, str(shard_dir), str(out_dir), batch_size, resume_after, resume_state)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _global_batches(per_rank: list[list[dict]]) -> list[dict]:
    """Step i of the global batch = rank 0's batch i, then rank 1's, ... (concatenated)."""
    steps = {len(batches) for batches in per_rank}
    assert len(steps) == 1, f"ranks yielded different numbers of batches: {steps}"
    merged = []
    for step in range(steps.pop()):
        parts = [batches[step] for batches in per_rank]
        merged.append(
            {
                "ids": [i for p in parts for i in p["ids"]],
                **{k: torch.cat([p[k] for p in parts]) for k in TENSOR_KEYS},
            }
        )
    return merged


def _canonical(batch: dict) -> dict:
    """A global batch as a set: samples sorted by clip id (ranks interleave samples differently)."""
    order = sorted(range(len(batch["ids"])), key=batch["ids"].__getitem__)
    index = torch.tensor(order)
    return {"ids": [batch["ids"][i] for i in order], **{k: v[index] for k, v in batch.items() if k != "ids"}}


def _assert_same_batches(actual: list[dict], expected: list[dict]) -> None:
    """Same global batches, step by step: the same clips with identical tensors (masks included)."""
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        a, e = _canonical(a), _canonical(e)
        assert a["ids"] == e["ids"], f"global batch {step} differs"
        for key in TENSOR_KEYS:
            assert torch.equal(a[key], e[key]), f"global batch {step}: {key} differs"


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    shard_dir = tmp_path_factory.mktemp("dist_shards")
    write_random_shards(shard_dir, NUM_CLIPS, frames=20, num_classes=5, seed=5, size_limit=1 << 12)
    out = tmp_path_factory.mktemp("dist_2ranks")
    ranks = _launch(2, shard_dir, out, PER_RANK_BATCH, resume_after=RESUME_AFTER)
    return shard_dir, ranks


def test_two_ranks_read_disjoint_complete_partitions(two_rank_run):
    _, ranks = two_rank_run
    seen = [[i for batch in r["epoch"] for i in batch["ids"]] for r in ranks]
    assert len(seen[0]) == len(seen[1]) == NUM_CLIPS // 2
    assert not set(seen[0]) & set(seen[1]), "a clip was read by both ranks"
    assert sorted(seen[0] + seen[1]) == [f"clip{i:05d}" for i in range(NUM_CLIPS)]


def test_resume_two_to_two_ranks_gives_identical_global_batches(two_rank_run):
    _, ranks = two_rank_run
    full = _global_batches([r["epoch"] for r in ranks])
    resumed = _global_batches([r["resumed"] for r in ranks])
    assert ranks[0]["state"]["sample_in_epoch"] == RESUME_AFTER * PER_RANK_BATCH * 2
    _assert_same_batches(resumed, full[RESUME_AFTER:])
    for r in ranks:  # at the same world size even each rank's order is the same
        assert [b["ids"] for b in r["resumed"]] == [b["ids"] for b in r["epoch"][RESUME_AFTER:]]


def test_one_rank_matches_and_resumes_two_rank_run(two_rank_run, tmp_path):
    shard_dir, ranks = two_rank_run
    full_two = _global_batches([r["epoch"] for r in ranks])
    (one,) = _launch(1, shard_dir, tmp_path, 2 * PER_RANK_BATCH, resume_state=ranks[0]["state"])
    # Same global batch size from scratch: the same global batches (order, masks, labels).
    _assert_same_batches(one["epoch"], full_two)
    # 2 -> 1 resume from the two-rank checkpoint continues exactly where it stopped.
    _assert_same_batches(one["resumed"], full_two[RESUME_AFTER:])
