"""The training order is the same at every layout: whole global batches, dealt out by slot.

``test_every_layout_reads_the_same_micro_batches`` deals an epoch out with
``af_train.data.order.micro_batch_positions`` for many layouts (nodes x ranks x DataLoader workers x
micro batch, accumulation making up the global batch), replays the DataLoader's turn over each rank's
workers and the engine's accumulation, and checks that step k reads positions kG .. (k+1)G - 1 once
each, that a micro batch (step, slot) holds the same positions in the same order at every layout with
the same micro batch, and that a node reads only its own positions modulo the node count (the
canonical-node locality of streaming's layout). No process is started; the multi-rank loaders over
streaming's real epochs are checked in test_data_epochs.py. The rest: the order record in the
loader state, and the layouts that are refused.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

from af_train.config import DataConfig
from af_train.data.dataset import DataError
from af_train.data.loader import build_dataloader
from af_train.data.order import (
    global_batch_problem,
    micro_batch_positions,
    node_layout_problem,
    order_changes,
    rank_slot,
    steps_in_epoch,
)

GLOBAL_BATCH = 8
LAYOUTS = [  # (nodes, ranks per node, DataLoader workers per rank, micro batch)
    (1, 1, 0, 8), (1, 1, 0, 4), (1, 1, 2, 4), (1, 1, 3, 2), (1, 1, 0, 1), (1, 2, 0, 4), (1, 2, 3, 4), (1, 2, 0, 2),
    (1, 2, 2, 2), (1, 4, 0, 2), (1, 4, 2, 1), (2, 1, 0, 4), (2, 1, 2, 2), (2, 2, 0, 2), (2, 2, 2, 1), (4, 2, 0, 1),
    (2, 4, 0, 1), (8, 1, 3, 1),
]


def _read(steps: int, nodes: int, ranks_per_node: int, workers: int, micro: int) -> dict[tuple[int, int], list[int]]:
    """{(step, slot): positions of that micro batch, in order} as the engine reads them at one layout."""
    ranks = nodes * ranks_per_node
    accumulation = GLOBAL_BATCH // (micro * ranks)
    read: dict[tuple[int, int], list[int]] = {}
    for node in range(nodes):
        for rank_of_node in range(ranks_per_node):
            slot = rank_slot(node, rank_of_node, nodes)
            per_worker = [list(micro_batch_positions(steps, GLOBAL_BATCH, micro, ranks, slot, w, max(workers, 1)))
                          for w in range(max(workers, 1))]
            # the DataLoader takes one micro batch from each worker in turn, skipping workers that are done
            batches = [b[i] for i in range(max(map(len, per_worker))) for b in per_worker if i < len(b)]
            assert len(batches) == steps * accumulation
            for c, batch in enumerate(batches):
                step, accumulation_step = divmod(c, accumulation)
                assert all(int(q) % nodes == node for q in batch), "a node read another node's position"
                # the slot a micro batch fills: recovered from its first position, checked below
                read[(step, int(batch[0]) - step * GLOBAL_BATCH)] = [int(q) for q in batch]
    return read


@pytest.mark.parametrize("steps", [1, 5])
def test_every_layout_reads_the_same_micro_batches(steps):
    by_micro: dict[int, dict] = {}
    for nodes, ranks_per_node, workers, micro in LAYOUTS:
        read = _read(steps, nodes, ranks_per_node, workers, micro)
        for k in range(steps):  # each step: its global batch, every position once
            positions = sorted(q for (step, _), batch in read.items() if step == k for q in batch)
            assert positions == list(range(k * GLOBAL_BATCH, (k + 1) * GLOBAL_BATCH)), (nodes, ranks_per_node, k)
        assert sorted(slot for _, slot in read) == sorted(list(range(GLOBAL_BATCH // micro)) * steps)
        expected = by_micro.setdefault(micro, read)  # the first layout with this micro batch
        assert read == expected, (nodes, ranks_per_node, workers, micro)
    assert sorted(by_micro) == [1, 2, 4, 8]


def test_layouts_that_cannot_match_are_named():
    assert node_layout_problem(4, 2) is None and node_layout_problem(2, 4) is None and node_layout_problem(1, 3) is None
    assert "data.num_canonical_nodes=2 on 3 nodes" in node_layout_problem(2, 3)
    assert global_batch_problem(8, 2, 4) is None
    assert "global batch 8 is not a multiple of the micro batch 3 x 2 ranks" in global_batch_problem(8, 3, 2)


def test_steps_and_order_changes():
    assert steps_in_epoch(45, 0, 8) == 5 and steps_in_epoch(45, 40, 8) == 0 and steps_in_epoch(45, 48, 8) == 0
    # 2 ranks x 2 accumulation steps x micro batch 2, rank 1, one worker: slots 1 and 3 of each step
    assert micro_batch_positions(2, 8, 2, 2, 1, 0, 1).tolist() == [[1, 5], [3, 7], [9, 13], [11, 15]]
    assert np.array_equal(micro_batch_positions(2, 8, 2, 2, 1, 1, 2), micro_batch_positions(2, 8, 2, 2, 1, 0, 1)[1::2])
    assert order_changes({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b: 2 -> 3", "c: None -> 4"]


def _loader(shards: str, loaders: list, **data: Any):
    cfg = DataConfig(train=shards, max_length=32, num_canonical_nodes=2, **data)
    loader = build_dataloader(cfg, "train", 3, mask=True, seed=4, global_batch=6)
    loaders.append(loader)
    return loader


def test_the_loader_state_records_the_data_order_and_a_resume_checks_it(multi_label_shards, loaders, caplog):
    shard_dir, _ = multi_label_shards  # 37 clips: 6 steps of 6 (two micro batches of 3) an epoch
    loader = _loader(str(shard_dir), loaders, shuffle_seed=5)
    batches = list(loader)
    assert len(batches) == 12 and sum(len(b["ids"]) for b in batches) == 36  # whole global batches only
    iterator = iter(loader)
    for _ in range(4):  # two steps into the second epoch
        next(iterator)
    state = loader.state_dict()
    assert (state["epoch"], state["sample_in_epoch"]) == (1, 12)
    order = state["order"]
    assert order["global_batch"] == 6 and order["num_canonical_nodes"] == 2 and order["shuffle_seed"] == 5
    assert order["mask_seed"] == 4 and order["clips_per_epoch"] == [37] and len(order["shards"]) == 64
    assert order["missing_indexes"] == []
    rest = [b["ids"] for b in iterator]

    with caplog.at_level(logging.WARNING, logger="af_train.data.loader"):
        same = _loader(str(shard_dir), loaders, shuffle_seed=5)
        same.load_state_dict(state)
        assert [b["ids"] for b in same] == rest
        assert not caplog.records

        other = _loader(str(shard_dir), loaders, shuffle_seed=6)
        other.load_state_dict(state)
        assert "shuffle_seed: 5 -> 6" in caplog.text and "differ from that run's from here on" in caplog.text
        resumed = [b["ids"] for b in other]  # the resumed epoch already in this run's order
        fresh = _loader(str(shard_dir), loaders, shuffle_seed=6)
        fresh.load_state_dict({k: v for k, v in state.items() if k != "order"} | {"shuffle_seed": 6})
        assert resumed == [b["ids"] for b in fresh] and resumed != rest

        caplog.clear()
        old = _loader(str(shard_dir), loaders, shuffle_seed=5)
        old.load_state_dict({k: v for k, v in state.items() if k != "order"})  # a checkpoint from before
        assert "records no data order" in caplog.text
        assert [b["ids"] for b in old] == rest


def test_layouts_streaming_cannot_split_alike_are_refused_before_any_work(multi_label_shards, monkeypatch):
    shard_dir, _ = multi_label_shards
    monkeypatch.setenv("WORLD_SIZE", "3")  # three nodes of one rank each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DataError, match="num_canonical_nodes=2 on 3 nodes"):
        build_dataloader(DataConfig(train=str(shard_dir), num_canonical_nodes=2), "train", 2, mask=False, seed=0)
    with pytest.raises(DataError, match="global batch 8 is not a multiple of the micro batch 2 x 3 ranks"):
        build_dataloader(DataConfig(train=str(shard_dir), num_canonical_nodes=3), "train", 2, mask=False, seed=0,
                         global_batch=8)
