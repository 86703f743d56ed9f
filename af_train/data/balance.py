"""Class-balanced sampling of a training split (``data.balanced_sampling``), built on streaming.

The target is AudioMAE's (and AST's) weighted sampling on AudioSet-2M: every class gets the weight
``1000 / (count + 0.01)`` from its number of training clips, every clip the sum of its labels'
weights, and clips are drawn in proportion to their weight. A clip of a rare class is drawn many
times per epoch, one of "Speech"/"Music" rarely. ``data.balance_power`` tempers it: class weight
``1000 / (count + 0.01) ** power``; 1 (the default) is AudioMAE's, 0.5 square-root sampling, which
moves each class's share only half way (in log) from its natural frequency to uniform: on a
moderate tail with few clips in the rare classes, full balancing repeats those few clips so often
that it overfits them (measured in the closing note of the toolkit issue).

Why rarity buckets and not a sampler. A per-clip weighted sampler (torch's ``WeightedRandomSampler``)
replaces streaming's sample partitioning: streaming could no longer split the epoch over canonical
nodes, ranks and workers, download shards ahead in order, or resume mid-epoch from its own state.
streaming does support weighting *streams* (``Stream(repeat=...)``), with everything else intact. So
the clips are split by weight into ``data.balance_buckets`` buckets (default 16; equal widths in log
weight: the weights inside a bucket differ by at most ``(max/min) ** (1 / buckets)``), each bucket is written as
its own MDS shard directory, and bucket ``b`` becomes a ``Stream`` with

    repeat_b = N * mean(weight in b) / sum(all weights)        (N: clips in the split)

so a clip's expected draws per epoch are those of the weighted sampler with its weight replaced by
its bucket's mean, and an epoch still has N clips. streaming realises a fractional repeat by taking
every clip ``floor(repeat)`` times plus a seeded random subset once more: fewer duplicates within an
epoch than sampling with replacement, the same expectation. The draws depend only on
``data.shuffle_seed`` and the epoch, so the order is deterministic, resumes mid-epoch from the
loader's state and is the same at any world size with the same global batch and
``data.num_canonical_nodes``.

Cost: the buckets are a copy of the split (codes only: about 6 kB per 10 s clip at 4 rows, 12 GB for
AudioSet-2M), written once, either ahead of time

    python3 -m af_train.data.balance SRC_SPLIT_DIR OUT_DIR [--buckets 16]

(then ``data.train=OUT_DIR``), or on first use into the run's cache (``data.local_cache`` or the
run directory). ``balance.json`` beside the buckets records the weights, repeats and the target
class frequencies; ``--report`` measures the class frequencies of one epoch against that target.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np

from af_train.data.dataset import INDEX_NAME, DataError
from af_train.distributed import barrier
from af_train.files import atomic_write
from af_train.shards import Manifest, shard_columns

logger = logging.getLogger(__name__)

PLAN_NAME = "balance.json"
BALANCE_VERSION = 1
CLASS_WEIGHT_SCALE = 1000.0  # AudioMAE/AST: class weight = 1000 / (clips of the class + 0.01)
CLASS_WEIGHT_EPS = 0.01
SHARD_HASHES = ["sha1", "xxh64"]


def class_counts(label_lists: list[np.ndarray], num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes, dtype=np.float64)
    for labels in label_lists:
        np.add.at(counts, np.asarray(labels, dtype=np.int64), 1.0)
    return counts


def clip_weights(label_lists: list[np.ndarray], num_classes: int, power: float = 1.0) -> np.ndarray:
    """Per-clip sampling weights: the sum of the clip's class weights ``1000 / (count + 0.01) ** power``
    (AudioMAE's for power 1; 0 for a clip without labels)."""
    class_weight = CLASS_WEIGHT_SCALE / (class_counts(label_lists, num_classes) + CLASS_WEIGHT_EPS) ** power
    return np.array([class_weight[np.asarray(labels, dtype=np.int64)].sum() for labels in label_lists])


def assign_buckets(weights: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket index per clip: equal-width bins of log(weight); clips of weight 0 share bucket 0."""
    positive = weights > 0
    if not positive.any():
        return np.zeros(len(weights), dtype=np.int64)
    logs = np.log(weights[positive])
    low, high = logs.min(), logs.max()
    index = np.zeros(len(weights), dtype=np.int64)
    if high > low:
        index[positive] = np.minimum(((logs - low) / (high - low) * buckets).astype(np.int64), buckets - 1)
    return index


def expected_class_frequency(label_lists: list[np.ndarray], draws: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of an epoch's label occurrences per class when clip i is drawn ``draws[i]`` times on average."""
    totals = np.zeros(num_classes, dtype=np.float64)
    for labels, count in zip(label_lists, draws):
        np.add.at(totals, np.asarray(labels, dtype=np.int64), count)
    return totals / max(totals.sum(), 1e-12)


def _read_split(source: Path) -> tuple[list[dict[str, Any]], Manifest]:
    from streaming import LocalDataset

    if not (source / INDEX_NAME).is_file():
        raise DataError(f"data.balanced_sampling: '{source}' holds no MDS shards ({INDEX_NAME}); point data.train "
                        "at a local split written by af-prepare (a remote split: run `python3 -m "
                        "af_train.data.balance` on a local copy first)")
    manifest = Manifest.load(source)
    dataset = LocalDataset(local=str(source))
    return [dataset[i] for i in range(len(dataset))], manifest


def write_buckets(source: Path, out: Path, buckets: int, power: float = 1.0) -> dict[str, Any]:
    """Split ``source`` into rarity buckets under ``out`` (written to a temporary folder, then renamed)."""
    from streaming import MDSWriter

    samples, manifest = _read_split(source)
    labels = [np.asarray(s["labels"], dtype=np.int64).reshape(-1) for s in samples]
    weights = clip_weights(labels, manifest.num_classes, power)
    index = assign_buckets(weights, buckets)
    total_weight, n = float(weights.sum()), len(samples)
    if total_weight <= 0:
        raise DataError(f"data.balanced_sampling: no clip of '{source}' has a label; nothing to balance")
    tmp = out.parent / f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}"  # nodes may share the cache
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plan_buckets, draws = [], np.zeros(n)
    for b in sorted(set(index.tolist())):
        members = np.flatnonzero(index == b)
        repeat = n * float(weights[members].mean()) / total_weight
        draws[members] = repeat
        name = f"bucket_{b:02d}"
        with MDSWriter(out=str(tmp / name), columns=shard_columns(manifest.codec.codebooks, manifest.frames),
                       hashes=SHARD_HASHES) as writer:
            for i in members:
                writer.write(samples[i])
        part = Manifest.from_dict({**json.loads(manifest.to_json()), "written": int(len(members))})
        part.extra = {**part.extra, "balanced_from": str(source), "bucket": int(b)}
        part.save(tmp / name)
        plan_buckets.append({"name": name, "clips": int(len(members)), "repeat": repeat,
                             "weight_min": float(weights[members].min()), "weight_max": float(weights[members].max())})
    plan = {
        "version": BALANCE_VERSION, "source": str(source), "clips": n, "power": float(power), "buckets": plan_buckets,
        "labels": manifest.labels,
        "target_class_frequency": expected_class_frequency(labels, n * weights / total_weight,
                                                           manifest.num_classes).tolist(),
        "bucketed_class_frequency": expected_class_frequency(labels, draws, manifest.num_classes).tolist(),
        "natural_class_frequency": expected_class_frequency(labels, np.ones(n), manifest.num_classes).tolist(),
    }
    atomic_write(tmp / PLAN_NAME, json.dumps(plan, indent=1) + "\n")
    try:
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)  # another process finished first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / PLAN_NAME).is_file():
            raise
    logger.info("balanced sampling: %d clips of %s in %d rarity buckets under %s (repeats %s)", n, source,
                len(plan_buckets), out, ", ".join(f"{b['repeat']:.3g}" for b in plan_buckets))
    return plan


def read_plan(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / PLAN_NAME
    if not path.is_file():
        return None
    plan = json.loads(path.read_text(encoding="utf-8"))
    if plan.get("version") != BALANCE_VERSION:
        raise DataError(f"{path}: balance plan version {plan.get('version')}, this af_train reads {BALANCE_VERSION}; "
                        "rebuild it with python3 -m af_train.data.balance")
    plan.setdefault("power", 1.0)  # plans written before data.balance_power were AudioMAE's
    return plan


def bucket_directory(train: str, cache_root: str, buckets: int, power: float = 1.0) -> Path:
    """Where the buckets of split ``train`` live: itself when it already is a bucket directory (written
    with the same power), else a folder in ``cache_root`` named by the split's shard index, the bucket
    count and the power."""
    prebuilt = read_plan(Path(train))
    if prebuilt is not None:
        if abs(prebuilt["power"] - power) > 1e-12:
            raise DataError(f"data.train '{train}' holds rarity buckets written with power {prebuilt['power']:g}, "
                            f"but data.balance_power is {power:g}: set data.balance_power={prebuilt['power']:g}, or "
                            f"rewrite the buckets with python3 -m af_train.data.balance --power {power:g}")
        return Path(train)
    index = Path(train) / INDEX_NAME
    if not index.is_file():
        raise DataError(f"data.balanced_sampling: '{train}' holds no MDS shards ({INDEX_NAME}); point data.train at "
                        "a local split written by af-prepare, or at buckets written by `python3 -m "
                        "af_train.data.balance SRC OUT`")
    key = f"|{Path(train).resolve()}|{buckets}" + (f"|power={power!r}" if power != 1.0 else "")  # 1.0: older caches
    digest = hashlib.sha1(index.read_bytes() + key.encode()).hexdigest()[:12]
    return Path(cache_root) / f"balanced-{digest}"


def prepare_buckets(train: str, cache_root: str, buckets: int, power: float = 1.0) -> tuple[Path, dict[str, Any]]:
    """Collective when a process group is up: local rank 0 writes the buckets once, the others wait."""
    out = bucket_directory(train, cache_root, buckets, power)
    if read_plan(out) is None and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_buckets(Path(train), out, buckets, power)
    barrier()
    plan = read_plan(out)
    if plan is None:
        raise DataError(f"data.balanced_sampling: the buckets of '{train}' were not written to {out}")
    return out, plan


def bucket_streams(directory: Path, plan: dict[str, Any]) -> list[Any]:
    """One streaming ``Stream`` per bucket, repeated as the plan says."""
    from streaming import Stream

    return [Stream(local=str(directory / b["name"]), repeat=b["repeat"]) for b in plan["buckets"]]


def measure_epoch(directory: Path, plan: dict[str, Any], seed: int = 1234, canonical_nodes: int = 1
                  ) -> np.ndarray:
    """Class frequencies of one epoch as the training loader draws it (one process)."""
    from streaming import StreamingDataset

    from af_train.data.shm import clean_stale_streaming_shm

    clean_stale_streaming_shm()
    dataset = StreamingDataset(streams=bucket_streams(directory, plan), shuffle=True, shuffle_seed=seed,
                               num_canonical_nodes=canonical_nodes, batch_size=1, replication=None)
    totals = np.zeros(len(plan["labels"]))
    for sample in dataset:
        np.add.at(totals, np.asarray(sample["labels"], dtype=np.int64).reshape(-1), 1.0)
    return totals / max(totals.sum(), 1e-12)


def format_report(plan: dict[str, Any], measured: np.ndarray | None) -> str:
    rows = [f"class | natural | target (class weight 1 / count ** {plan['power']:g}) | bucketed expectation | "
            "measured (one epoch)",
            "---|---|---|---|---"]
    for c, name in enumerate(plan["labels"]):
        got = f"{measured[c]:.4f}" if measured is not None else "-"
        rows.append(f"{name} | {plan['natural_class_frequency'][c]:.4f} | {plan['target_class_frequency'][c]:.4f} | "
                    f"{plan['bucketed_class_frequency'][c]:.4f} | {got}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m af_train.data.balance", description=(
        "Split a training split into rarity buckets for data.balanced_sampling (see the module docstring)."))
    parser.add_argument("source", help="a local split directory written by af-prepare")
    parser.add_argument("out", help="the bucket directory to write (then data.train=OUT)")
    parser.add_argument("--buckets", type=int, default=16)
    parser.add_argument("--power", type=float, default=1.0,
                        help="class weight 1 / count ** power (1: AudioMAE, the default; 0.5: square root)")
    parser.add_argument("--report", action="store_true", help="measure one epoch's class frequencies vs the target")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    if not 0.0 < args.power <= 1.0:
        parser.error(f"--power must be in (0, 1], got {args.power}")
    plan = read_plan(out)
    if plan is not None and abs(plan["power"] - args.power) > 1e-12:
        parser.error(f"{out} already holds buckets written with power {plan['power']:g}; choose another OUT")
    plan = plan or write_buckets(Path(args.source), out, args.buckets, args.power)
    print(format_report(plan, measure_epoch(out, plan) if args.report else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
