"""af-embed: clip embeddings of many audio files, resumable.

    af-embed MODEL AUDIO... --out DIR [--recursive] [--layer L] [--format npy|npz] [--part-size N]
    af-embed MODEL --csv FILE --out DIR ...

Embeddings are the hidden state of ``--layer`` (default: the last; 0 = the embedding layer, negative
counts from the end) mean-pooled over each window of the training clip length, averaged over the
windows of the file. MODEL as for af-predict (a pretraining run's model.pt works too: no classifier
needed).

DIR receives ``embeddings.npy`` [N, H] float32 and ``ids.jsonl`` (line k: row k's id as a JSON string:
the CSV's ``id`` column, else the path as given; any file name round-trips, newlines included), or with
``--format npz`` one ``embeddings.npz`` holding both (``ids``, ``embeddings``). Files are processed in
parts of ``--part-size``; each finished part is committed under ``DIR/parts/`` so an interrupted run
started again with the same arguments continues where it stopped (another model or layer is refused).
Unusable files are listed in ``DIR/failures.jsonl`` with the reason and skipped; the exit status is 1
when any was, unless --keep-going.

af-embed touches only files it created: ``DIR/embed_state.json`` records the settings and what the run
created, and only those are replaced or removed. DIR is checked before the model loads: a ``parts/`` it
did not create is refused, and existing outputs are replaced only with ``--overwrite``.

Several ranks (:mod:`~af_train.inference.ranks`): ``--num_cpu_ranks N``, ``--num_gpus N`` or ``--hostfile``
start the DeepSpeed launcher (``torchrun`` and ``srun`` work too; DIR must then be on a filesystem every
node sees). Input k belongs to rank k mod world_size; each rank embeds its own inputs on its own device
and commits its parts as ``DIR/parts/rank-R-part-K.npz`` (each part records every row's and failure's
place in the listing). When every rank has finished, rank 0 merges the parts into the same files, in
the same input order, as one process writes, adds ``DIR/ranks.json`` (the rule, and each rank's host,
device, inputs, rows and skips by reason), and removes the parts. When a rank fails, rank 0 names it
and exits 1 without writing the merged files; the committed parts stay, and a rerun with the same
arguments and the same number of ranks continues (another number of ranks is refused).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from af_train.files import atomic_open, output_problem
from af_train.inference.cli_common import (
    Failures,
    add_model_arguments,
    build_tagger,
    find_audio,
    positive_int,
    progress,
    read_csv_list,
)
from af_train.inference.ranks import (
    RANK_RULE,
    add_rank_arguments,
    failed_ranks_message,
    join_ranks,
    launch_requested,
    leave_ranks,
    rank_indices,
    report_to_rank0,
    wait_for_rank0,
)
from af_train.launcher import start_launcher, wants_launcher

log = logging.getLogger(__name__)

STATE_NAME = "embed_state.json"
PARTS = "parts"
FAILURES = "failures.jsonl"
IDS = "ids.jsonl"
RANKS = "ranks.json"  # several ranks: the rule that split the inputs, and what each rank did
OUTPUTS = {"npy": ("embeddings.npy", IDS, FAILURES), "npz": ("embeddings.npz", FAILURES)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="af-embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("audio", nargs="*", help="audio files or folders")
    parser.add_argument("--csv", help="CSV with a 'path' column (and optionally 'id') instead of AUDIO")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--recursive", action="store_true", help="look for audio in sub-folders too")
    parser.add_argument("--layer", type=int, help="hidden state to pool (default: the last layer)")
    parser.add_argument("--format", choices=["npy", "npz"], default="npy")
    parser.add_argument("--part-size", type=positive_int, default=512,
                        help="files per committed part (default 512)")
    parser.add_argument("--keep-going", action="store_true", help="exit 0 even when files were skipped")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs in --out that an earlier, finished af-embed (or anything else) left")
    add_rank_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    parser = parser or build_parser()
    args = parser.parse_intermixed_args(argv)  # options may come between the audio files
    if bool(args.audio) == bool(args.csv):
        parser.error("give audio files/folders or --csv FILE (one of them)")
    return args


def _arguments_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the files the arguments name, found before anything is read or loaded."""
    if args.csv and not Path(args.csv).is_file():
        return f"--csv {args.csv}: no such file; give the CSV listing the audio (a 'path' column)"
    return output_problem(args.out, folder=True)


def _read_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    state = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(state, dict) and "settings" in state:
        return state
    return {"settings": state, "created": [PARTS]}  # an earlier version's state: it always created parts/


def _outputs(fmt: str, several_ranks: bool) -> tuple[str, ...]:
    """The files af-embed writes into --out: several ranks add their provenance (``ranks.json``)."""
    return (*OUTPUTS[fmt], RANKS) if several_ranks else OUTPUTS[fmt]


def _out_problem(out: Path, state: dict | None, fmt: str, overwrite: bool, several_ranks: bool = False) -> str | None:
    """Why af-embed may not write into ``out`` (checked before the model loads), or None."""
    created = set(state["created"]) if state else set()
    if (out / PARTS).exists() and PARTS not in created:
        return (f"{out / PARTS} exists and af-embed did not create it (no {STATE_NAME} records it); its files "
                "would be mixed with af-embed's parts: give another --out")
    taken = [name for name in _outputs(fmt, several_ranks) if (out / name).exists() and name not in created]
    if taken and not overwrite:
        return (f"{out} already holds {', '.join(taken)}; give another --out, or pass --overwrite to replace "
                f"{'it' if len(taken) == 1 else 'them'}")
    return None


def _atomic_save(path: Path, write) -> None:
    """``write(binary file)``; a reader (or a resumed run) never sees half a file."""
    with atomic_open(path, "wb") as f:
        write(f)


def _text(text: str):
    return lambda f: f.write(text.encode("utf-8"))


def _fingerprint(args: argparse.Namespace, tagger, ids: list[str], world_size: int) -> dict:
    settings = {
        "model": str(Path(args.model).resolve()), "source": tagger.source, "layer": args.layer,
        "hop_seconds": tagger.hop_seconds, "part_size": args.part_size,
        "inputs_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16], "count": len(ids),
    }
    if world_size > 1:  # each rank's parts follow from the rank count: a rerun must use the same
        settings["world_size"] = world_size
    return settings


def _part_name(rank: int, world_size: int, k: int) -> str:
    """Part ``k`` of ``rank``'s inputs (one process: ``part-K.npz``, as before ranks existed)."""
    return f"part-{k:05d}.npz" if world_size == 1 else f"rank-{rank:05d}-part-{k:05d}.npz"


def _part_count(total: int, rank: int, world_size: int, part_size: int) -> int:
    return -(-len(rank_indices(total, rank, world_size)) // part_size)


def _save_state(path: Path, settings: dict, created: list[str]) -> None:
    _atomic_save(path, _text(json.dumps({"settings": settings, "created": created}, indent=2) + "\n"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parse_args(argv, parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if problem := _arguments_problem(args):
        print(f"af-embed: error: {problem}", file=sys.stderr)
        return 2
    if args.csv:
        files, ids = read_csv_list(Path(args.csv))
    else:
        files = find_audio(args.audio, args.recursive)
        ids = [str(f) for f in files]
    if not files:
        print("af-embed: error: no audio files given", file=sys.stderr)
        return 2
    out = Path(args.out)
    if problem := _out_problem(out, _read_state(out / STATE_NAME), args.format, args.overwrite,
                               several_ranks=wants_launcher(args)):
        print(f"af-embed: error: {problem}", file=sys.stderr)
        return 2
    if launch_requested(parser, args):
        return start_launcher("af-embed", "af_train.inference.embed", argv, sys.stderr)
    placement = join_ranks(args, "af-embed")
    try:
        return _run(args, files, ids, placement)
    finally:
        leave_ranks(placement)


def _establish(args: argparse.Namespace, fingerprint: dict, several_ranks: bool) -> tuple[str, list[str]]:
    """Check --out against the settings and record the run in its state: ("ok", what the run created) or
    ("error", why not). Rank 0's job when there are several."""
    out = Path(args.out)
    state_path = out / STATE_NAME
    state = _read_state(state_path)
    if problem := _out_problem(out, state, args.format, args.overwrite, several_ranks):
        return "error", [problem]
    if state is not None and state["settings"] != fingerprint:
        changed = sorted(k for k in {*fingerprint, *state["settings"]}
                         if state["settings"].get(k) != fingerprint.get(k))
        return "error", [f"{out} holds embeddings made with other settings ({', '.join(changed)}); give another "
                         "--out, or rerun with the original settings to finish that run"]
    created = list(state["created"]) if state is not None else []
    if PARTS not in created:  # recorded before it exists: a crash in between leaves nothing unrecorded
        created.append(PARTS)
        out.mkdir(parents=True, exist_ok=True)
        _save_state(state_path, fingerprint, created)
    (out / PARTS).mkdir(exist_ok=True)
    return "ok", created


def _embed_part(args, tagger, files: list[Path], ids: list[str], mine: list[int], rank: int, world: int,
                failures: Failures, bar) -> tuple[int, float]:
    """Embed this rank's inputs part by part, each part committed as it is finished (an earlier run's parts
    are kept); (files embedded, seconds of their audio) this run."""
    parts = Path(args.out) / PARTS
    done, audio_seconds = 0, 0.0
    for k in range(-(-len(mine) // args.part_size)):
        part = parts / _part_name(rank, world, k)
        chunk = mine[k * args.part_size:(k + 1) * args.part_size]
        if part.is_file():  # committed by an earlier run
            bar.update(len(chunk))
            continue
        rows, kept, kept_at, failed, failed_at = [], [], [], [], []
        for at, result in zip(chunk, tagger.results([files[i] for i in chunk], scores=False, embeddings=True,
                                                    layer=args.layer, names=[ids[i] for i in chunk])):
            bar.update(1)
            failures.warn_all(ids[at], result.warnings)
            if result.ok:
                rows.append(result.embedding.astype(np.float32))
                kept.append(ids[at])
                kept_at.append(at)
                done += 1
                audio_seconds += result.seconds
            else:
                failures.add(ids[at], result.reason, result.message)
                failed.append({"id": ids[at], "reason": result.reason, "message": result.message})
                failed_at.append(at)
        embeddings = np.stack(rows) if rows else np.zeros((0, tagger.embedding_size), np.float32)
        # rows_at / failures_at: each row's and failure's index in the listing, for the merge in input order
        _atomic_save(part, lambda f, e=embeddings, i=kept, x=failed, ra=kept_at, fa=failed_at: np.savez(
            f, embeddings=e, ids=np.array(i, dtype=str), failures=np.array([json.dumps(r) for r in x], dtype=str),
            rows_at=np.array(ra, dtype=np.int64), failures_at=np.array(fa, dtype=np.int64)))
    return done, audio_seconds


def _merge_parts(parts: Path, total: int, world: int, part_size: int,
                 width: int) -> tuple[np.ndarray, list[str], list[str], list[dict]]:
    """Every rank's parts in input order: (embeddings [rows, H], ids, failure lines, what each rank's parts hold).

    Raises RuntimeError when the parts do not account for every input exactly once (rows + skips = inputs)."""
    matrices, ids, failures, rows_at, failures_at, tallies = [], [], [], [], [], []
    for rank in range(world):
        tally = {"rank": rank, "inputs": len(rank_indices(total, rank, world)), "rows": 0, "skipped": Counter()}
        for k in range(_part_count(total, rank, world, part_size)):
            with np.load(parts / _part_name(rank, world, k)) as data:
                matrices.append(data["embeddings"])
                ids += data["ids"].tolist()
                lines = data["failures"].tolist()
                if "rows_at" in data.files:
                    rows_at.append(data["rows_at"])
                    failures_at.append(data["failures_at"])
                # else: a part of an earlier version (one process only): its rows are already in input order
            failures += lines
            tally["rows"] += len(matrices[-1])
            tally["skipped"].update(json.loads(line)["reason"] for line in lines)
        tallies.append({**tally, "skipped": dict(sorted(tally["skipped"].items()))})
    matrix = np.concatenate(matrices) if matrices else np.zeros((0, width), np.float32)
    if rows_at:
        row_order, failure_order = np.concatenate(rows_at), np.concatenate(failures_at)
        covered = np.sort(np.concatenate([row_order, failure_order]))
        if not np.array_equal(covered, np.arange(total)):
            raise RuntimeError(f"the parts in {parts} hold {len(row_order)} rows + {len(failure_order)} skips for "
                               f"{total} inputs, not each input once; delete {parts} and run again")
        by_row, by_failure = np.argsort(row_order, kind="stable"), np.argsort(failure_order, kind="stable")
        matrix, ids, failures = matrix[by_row], [ids[i] for i in by_row], [failures[i] for i in by_failure]
    return matrix, ids, failures, tallies


def _run(args: argparse.Namespace, files: list[Path], ids: list[str], placement) -> int:
    from af_train import distributed
    from af_train.inference import InferenceError

    rank, world = placement.rank, placement.world_size
    out = Path(args.out)
    parts = out / PARTS
    state_path = out / STATE_NAME
    try:
        tagger = build_tagger(args, reject_silent=False)
        tagger.resolve_layer(args.layer)
    except InferenceError as exc:
        print(f"af-embed: error: {exc}", file=sys.stderr)
        return 2
    fingerprint = _fingerprint(args, tagger, ids, world)
    if world == 1:
        outcome, detail = _establish(args, fingerprint, False)
    else:  # rank 0 checks and records the run; every rank starts from its answer
        outcome, detail = distributed.broadcast_from_rank0(
            distributed.result_or_exception(_establish, args, fingerprint, True) if rank == 0 else None)
    if outcome == "error":
        if rank == 0:
            print(f"af-embed: error: {detail[0]}", file=sys.stderr)
        return 2
    created = detail

    mine = rank_indices(len(files), rank, world)
    if world > 1:
        log.info("rank %d of %d (%s): %d of %d inputs (%s)", rank, world, tagger.device, len(mine), len(files),
                 RANK_RULE)
    failures = Failures(log)
    started = time.perf_counter()
    status = {"rank": rank, "code": 0, "error": None, "done": 0, "seconds": 0.0, "device": str(tagger.device)}
    bar = progress(len(mine) if rank == 0 else 0, "af-embed" if world == 1 else f"af-embed rank 0 of {world}")
    try:
        done, audio_seconds = _embed_part(args, tagger, files, ids, mine, rank, world, failures, bar)
        status.update(done=done, seconds=audio_seconds)
    except Exception as exc:  # noqa: BLE001 - with several ranks: reported to rank 0, which names this rank
        if world == 1:
            raise
        log.exception("rank %d failed", rank)
        status.update(code=1, error=f"{type(exc).__name__}: {exc}")
        done, audio_seconds = 0, 0.0
    finally:
        bar.close()
    if world > 1:
        statuses = report_to_rank0({**status, "skipped": dict(failures.by_reason), "warned": dict(failures.warned)})
        if statuses is None:
            if rank == 0:
                missing = [r for r in range(world) if not all(
                    (parts / _part_name(r, world, k)).is_file() for k in range(_part_count(len(files), r, world,
                                                                                          args.part_size)))]
                print(f"af-embed: error: a rank stopped without reporting; rank(s) {', '.join(map(str, missing))} "
                      f"did not finish their parts; the finished parts are kept in {parts}: rerun the same command "
                      "to continue", file=sys.stderr)
            return 1
        if problem := failed_ranks_message("af-embed", statuses):
            if rank == 0:
                print(f"{problem}; the finished parts are kept in {parts}: rerun the same command to continue",
                      file=sys.stderr)
            wait_for_rank0()
            return 1 if rank == 0 or status["code"] else 0

    with distributed.ranks_leave_together(world):  # rank 0 merges; the others wait for it
        if rank != 0:
            return 0
        if world > 1:
            failures.by_reason = sum((Counter(s["skipped"]) for s in statuses), Counter())
            failures.warned = sum((Counter(s["warned"]) for s in statuses), Counter())
            done, audio_seconds = sum(s["done"] for s in statuses), sum(s["seconds"] for s in statuses)
        try:
            matrix, all_ids, all_failures, tallies = _merge_parts(parts, len(files), world, args.part_size,
                                                                  tagger.embedding_size)
        except RuntimeError as exc:
            print(f"af-embed: error: {exc}", file=sys.stderr)
            return 1
        outputs = _outputs(args.format, world > 1)
        _save_state(state_path, fingerprint, sorted({*created, *outputs}))
        if args.format == "npz":
            _atomic_save(out / "embeddings.npz",
                         lambda f: np.savez(f, embeddings=matrix, ids=np.array(all_ids, dtype=str)))
        else:
            _atomic_save(out / "embeddings.npy", lambda f: np.save(f, matrix))
            _atomic_save(out / IDS, _text("".join(json.dumps(i) + "\n" for i in all_ids)))
        _atomic_save(out / FAILURES, _text("".join(f"{x}\n" for x in all_failures)))
        if world > 1:
            hosts = {s["rank"]: (s["host"], s["device"]) for s in statuses}
            provenance = {"rule": RANK_RULE, "world_size": world, "inputs": len(files), "rows": len(all_ids),
                          "skipped": len(all_failures),
                          "ranks": [{**t, "host": hosts[t["rank"]][0], "device": hosts[t["rank"]][1]} for t in tallies]}
            _atomic_save(out / RANKS, _text(json.dumps(provenance, indent=2) + "\n"))
        for r in range(world):  # only the parts this command wrote; anything else in parts/ stays
            for k in range(_part_count(len(files), r, world, args.part_size)):
                (parts / _part_name(r, world, k)).unlink(missing_ok=True)
        try:
            parts.rmdir()
        except OSError:
            log.warning("%s holds files af-embed did not write; left in place", parts)
        state_path.unlink()
        elapsed = time.perf_counter() - started
        skipped = len(all_failures)
        log.info("%d embeddings [%d x %d] in %s (%d skipped, see %s); this run: %s in %.1f s (%.1fx real time)",
                 len(all_ids), *matrix.shape, out, skipped, out / FAILURES, failures.summary(done), elapsed,
                 audio_seconds / max(elapsed, 1e-9))
        return 1 if skipped and not args.keep_going else 0


if __name__ == "__main__":
    sys.exit(main())
