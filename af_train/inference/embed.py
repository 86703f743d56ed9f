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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
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

log = logging.getLogger(__name__)

STATE_NAME = "embed_state.json"
PARTS = "parts"
FAILURES = "failures.jsonl"
IDS = "ids.jsonl"
OUTPUTS = {"npy": ("embeddings.npy", IDS, FAILURES), "npz": ("embeddings.npz", FAILURES)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    args = parser.parse_args(argv)
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


def _out_problem(out: Path, state: dict | None, fmt: str, overwrite: bool) -> str | None:
    """Why af-embed may not write into ``out`` (checked before the model loads), or None."""
    created = set(state["created"]) if state else set()
    if (out / PARTS).exists() and PARTS not in created:
        return (f"{out / PARTS} exists and af-embed did not create it (no {STATE_NAME} records it); its files "
                "would be mixed with af-embed's parts: give another --out")
    taken = [name for name in OUTPUTS[fmt] if (out / name).exists() and name not in created]
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


def _fingerprint(args: argparse.Namespace, tagger, ids: list[str]) -> dict:
    return {
        "model": str(Path(args.model).resolve()), "source": tagger.source, "layer": args.layer,
        "hop_seconds": tagger.hop_seconds, "part_size": args.part_size,
        "inputs_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16], "count": len(ids),
    }


def _save_state(path: Path, settings: dict, created: list[str]) -> None:
    _atomic_save(path, _text(json.dumps({"settings": settings, "created": created}, indent=2) + "\n"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from af_train.inference import InferenceError

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
    parts = out / PARTS
    state_path = out / STATE_NAME
    state = _read_state(state_path)
    if problem := _out_problem(out, state, args.format, args.overwrite):
        print(f"af-embed: error: {problem}", file=sys.stderr)
        return 2
    try:
        tagger = build_tagger(args, reject_silent=False)
        tagger._check_layer(args.layer)
    except InferenceError as exc:
        print(f"af-embed: error: {exc}", file=sys.stderr)
        return 2

    fingerprint = _fingerprint(args, tagger, ids)
    if state is not None and state["settings"] != fingerprint:
        changed = sorted(k for k in fingerprint if state["settings"].get(k) != fingerprint[k])
        print(f"af-embed: error: {out} holds embeddings made with other settings ({', '.join(changed)}); give "
              "another --out, or rerun with the original settings to finish that run", file=sys.stderr)
        return 2
    created = list(state["created"]) if state is not None else []
    if PARTS not in created:  # recorded before it exists: a crash in between leaves nothing unrecorded
        created.append(PARTS)
        out.mkdir(parents=True, exist_ok=True)
        _save_state(state_path, fingerprint, created)
    parts.mkdir(exist_ok=True)

    failures = Failures(log)
    count = -(-len(files) // args.part_size)
    started, done, audio_seconds = time.perf_counter(), 0, 0.0
    bar = progress(len(files), "af-embed")
    try:
        for k in range(count):
            part = parts / f"part-{k:05d}.npz"
            chunk = slice(k * args.part_size, (k + 1) * args.part_size)
            if part.is_file():  # committed by an earlier run
                bar.update(len(files[chunk]))
                continue
            rows, kept, failed = [], [], []
            for name, result in zip(ids[chunk], tagger.results(files[chunk], scores=False, embeddings=True,
                                                                 layer=args.layer, names=ids[chunk])):
                bar.update(1)
                failures.warn_all(name, result.warnings)
                if result.ok:
                    rows.append(result.embedding.astype(np.float32))
                    kept.append(name)
                    done += 1
                    audio_seconds += result.seconds
                else:
                    failures.add(name, result.reason, result.message)
                    failed.append({"id": name, "reason": result.reason, "message": result.message})
            embeddings = np.stack(rows) if rows else np.zeros((0, tagger.embedding_size), np.float32)

            _atomic_save(part, lambda f, e=embeddings, i=kept, x=failed: np.savez(
                f, embeddings=e, ids=np.array(i, dtype=str), failures=np.array([json.dumps(r) for r in x], dtype=str)))
    finally:
        bar.close()

    embeddings, all_ids, all_failures = [], [], []
    for k in range(count):
        with np.load(parts / f"part-{k:05d}.npz") as data:
            embeddings.append(data["embeddings"])
            all_ids += data["ids"].tolist()
            all_failures += data["failures"].tolist()
    matrix = np.concatenate(embeddings) if embeddings else np.zeros((0, tagger.embedding_size), np.float32)
    _save_state(state_path, fingerprint, sorted({*created, *OUTPUTS[args.format]}))
    if args.format == "npz":
        _atomic_save(out / "embeddings.npz", lambda f: np.savez(f, embeddings=matrix, ids=np.array(all_ids, dtype=str)))
    else:
        _atomic_save(out / "embeddings.npy", lambda f: np.save(f, matrix))
        _atomic_save(out / IDS, _text("".join(json.dumps(i) + "\n" for i in all_ids)))
    _atomic_save(out / FAILURES, _text("".join(f"{x}\n" for x in all_failures)))
    for k in range(count):  # only the parts this command wrote; anything else in parts/ stays
        (parts / f"part-{k:05d}.npz").unlink(missing_ok=True)
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
