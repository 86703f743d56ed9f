"""The training order: the same global batches, and the same micro batches, at any world layout.

What streaming gives. For epoch ``e`` it lays out one sequence ``S`` of sample ids that depends only
on the data (streams, their repeat/choose), ``data.shuffle_seed``, ``e`` and
``data.num_canonical_nodes`` (shuffled per canonical node, the canonical nodes interleaved), and
deals it out over nodes, ranks and DataLoader workers, padding each rank's share at the epoch's end
(clips repeated to a multiple of the rank count, -1 to whole micro batches per worker).

Why that was not enough (issue 21). The padding and the DataLoader's per-rank drop of an incomplete
micro batch end an epoch at a different micro batch at different layouts. With accumulation, a step
then took its first micro batch from the old epoch and the rest from the new one, and every later
step was shifted; only the epoch a resume lands in was cut the same way, from its sample count. And
even inside an epoch, a rank's micro batch held other clips at each layout (rank g of D reads
``S[g], S[g + D], ...``), so the same global batch was summed in another order.

What we do, for the training split. streaming's node leader lays the epoch out once as for a single
rank with a single worker -- ``S`` itself, from the resume offset ``s`` -- and we deal it out by a
rule that depends on the global batch ``G`` and the micro batch ``b`` only:
- step ``k`` reads ``S[s + kG : s + (k+1)G]``; an epoch has ``(E - s) // G`` steps (``E``: its size
  after repeat/choose) and leaves its last ``(E - s) % G`` clips out, the same ones at every layout;
- the step's ``V = G / b`` micro batches are slots: slot ``v`` holds ``S[s + kG + v + V*t]``, ``t < b``;
- rank ``g`` of ``D`` (``g = node + nodes x rank on the node``) reads slots ``g, g + D, ...`` in its
  ``A = V / D`` accumulation steps, and its DataLoader workers take its micro batches in turn.
So a micro batch holds the same clips in the same order at every layout with the same micro batch
(1 rank x 2 accumulation steps and 2 ranks read the same two micro batches; only the sum of their
gradients is formed elsewhere), a checkpoint is always at a multiple of ``G`` into its epoch, and a
node reads only the positions that are its own modulo the node count, which streaming's canonical
nodes keep within that node's shards. ``data.num_canonical_nodes`` and the node count must divide one
another (streaming refuses other splits, for evaluation too), which is checked before training.

What the order depends on (``AudioCodeDataset.order_record``) travels with the loader's state in every
checkpoint; ``order_changes`` names what differs on resume.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def node_layout_problem(num_canonical_nodes: int, nodes: int) -> str | None:
    """Why streaming cannot split an epoch over ``nodes`` physical nodes, or None."""
    if num_canonical_nodes % nodes == 0 or nodes % num_canonical_nodes == 0:
        return None
    return (f"data.num_canonical_nodes={num_canonical_nodes} on {nodes} nodes: streaming splits an epoch over the "
            "nodes only when one of the two numbers divides the other (it refuses the others, for validation too); "
            f"set data.num_canonical_nodes to a multiple of {nodes} (e.g. {nodes}), and keep it for the whole run: "
            "it is part of the data order")


def global_batch_problem(global_batch: int, micro_batch: int, ranks: int) -> str | None:
    """Why ``global_batch`` cannot be read as whole micro batches on ``ranks`` ranks, or None."""
    if global_batch >= 1 and global_batch % (micro_batch * ranks) == 0:
        return None
    return (f"global batch {global_batch} is not a multiple of the micro batch {micro_batch} x {ranks} ranks; "
            "choose a micro batch size (or world size) that divides it")


def steps_in_epoch(epoch_size: int, sample_in_epoch: int, global_batch: int) -> int:
    """Whole global batches left in an epoch of ``epoch_size`` samples that starts at ``sample_in_epoch``."""
    return max(epoch_size - sample_in_epoch, 0) // global_batch


def rank_slot(node: int, rank_of_node: int, nodes: int) -> int:
    """The rank's place among the data-parallel ranks: its first slot (node-major interleave, so that a
    node's positions are its own modulo the node count)."""
    return node + nodes * rank_of_node


def micro_batch_positions(steps: int, global_batch: int, micro_batch: int, ranks: int, slot: int, worker: int,
                          workers: int) -> np.ndarray:
    """Positions in the epoch's sequence (from the resume offset) of one DataLoader worker's micro
    batches, in the order it yields them: int64 [micro batches, micro_batch] (see the module docstring).

    The rank reads its micro batches ``c = k * A + a`` (step ``k``, accumulation step ``a``) from slot
    ``slot + ranks * a`` of step ``k``; worker ``w`` of ``workers`` holds those with ``c % workers == w``.
    """
    slots = global_batch // micro_batch
    accumulation = slots // ranks
    mine = np.arange(worker, steps * accumulation, workers, dtype=np.int64)
    step, accumulation_step = np.divmod(mine, accumulation)
    first = step * global_batch + slot + ranks * accumulation_step
    return first[:, None] + slots * np.arange(micro_batch, dtype=np.int64)[None, :]


def order_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every entry of two order records that differs."""
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in sorted(set(saved) | set(current))
            if saved.get(key) != current.get(key)]
