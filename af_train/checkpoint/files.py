"""Checkpoint files: layout, naming, finding, verification, metadata, consolidation, retention.

Checkpoints are either complete or ignored. Layout of ``<run_dir>/checkpoints``::

    step_00000100/                      one checkpoint (a DeepSpeed tag directory)
        mp_rank_00_model_states.pt ...  DeepSpeed's model / optimizer / scheduler state
        af_state/rank_00000.pt          ours, per rank: RNG states, data-loader position; rank 0's also
                                        the weight average (train.ema_decay), the same on every rank
        af_meta.json                    ours: step, samples, tokens, world size, ZeRO stage, recipe + hash,
                                        and the size and xxh64 of every other file (``files``)
        COMPLETE                        written last, after every rank finished writing
    step_00000100_universal/            DeepSpeed universal form, made when resuming at another world size
    latest                              tag of the newest complete checkpoint (moved only to complete ones)
    best                                tag and value of the best checkpoint by train.best_metric

At the end of a run the engine writes ``<run_dir>/final/model.{pt,safetensors}`` (the last checkpoint)
and ``<run_dir>/best/model.safetensors`` + ``af_best.json`` (the checkpoint selected on validation):
consolidated fp32 weights with their labels, tokenizer identity and framing, which inference reads
without unpickling.

A crash mid-save leaves a directory without ``COMPLETE``: it is never resumed from, ``latest`` still
names the previous checkpoint, and the next save of the same step replaces it.

Damage after a complete save (a truncated or altered file) is found by ``verify``: before resuming,
every file's size is checked against ``af_meta.json``, and its xxh64 unless hashes are skipped
(``--skip-checkpoint-hashes``). ``--resume auto`` then falls back to the newest intact checkpoint,
naming the damaged file; a damaged checkpoint named explicitly is refused with the same message.

Everything here works in one process without DeepSpeed (``describe_files`` and
``convert_to_universal`` share their work with the other ranks when a process group is up); the
Trainer's side (resume, load, save) is ``af_train.checkpoint.manager``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from af_train.distributed import barrier, broadcast_from_rank0, gather_objects
from af_train.files import atomic_write, xxh64_file
from af_train.model.checkpoint import CheckpointError  # one error for weight files and training checkpoints

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
META = "af_meta.json"
RANK_DIR = "af_state"
LATEST = "latest"
BEST = "best"
BEST_RECORD = "af_best.json"  # beside <run>/best/model.safetensors: a copy of the ``best`` record it was made from
UNIVERSAL_SUFFIX = "_universal"
EMA_KEY = "ema"  # the weight average's state_dict, in rank 0's rank file only
_TAG = re.compile(r"^step_(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int | None:
    match = _TAG.match(tag)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / META).is_file()


# --------------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------------


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(step_of(p.name), p) for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None]
    return [p for _, p in sorted(found) if is_complete(p)]


def latest_complete(root: Path) -> Path | None:
    """What ``latest`` names if that is complete, else the newest complete checkpoint found."""
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if is_complete(candidate):
            return candidate
        log.warning("%s names '%s', which is not a complete checkpoint; scanning %s", pointer, candidate, root)
    found = complete_checkpoints(root)
    return found[-1] if found else None


def newest_intact(root: Path, hashes: bool = True) -> Path | None:
    """The newest complete checkpoint under ``root`` that passes ``verify`` (``latest`` first); each
    damaged one on the way is logged, naming the file. Raises when there are checkpoints but none is intact."""
    newest = latest_complete(root)
    if newest is None:
        return None
    candidates = [newest] + [p for p in reversed(complete_checkpoints(root)) if p != newest]
    problems = []
    for candidate in candidates:
        problem = verify(candidate, hashes)
        if problem is None:
            if problems:
                log.warning("resuming from %s, the newest intact checkpoint", candidate)
            return candidate
        log.warning("%s; falling back to the previous checkpoint", problem)
        problems.append(problem)
    raise CheckpointError(f"no intact checkpoint in {root}: " + "; ".join(problems) + ". Move the damaged "
                          "checkpoints away to start over, or give another train.run_dir")


def read_best(root: Path) -> tuple[str, float] | None:
    """(tag, metric value) of the checkpoint recorded as the best under ``root``, or None."""
    pointer = root / BEST
    if not pointer.is_file():
        return None
    data = json.loads(pointer.read_text(encoding="utf-8"))
    return data["tag"], float(data["value"])


def resolve_resume(spec: str, run_dir: Path, hashes: bool = True) -> Path | None:
    """The checkpoint directory to resume from for ``--resume spec`` (``auto`` | ``none`` | a path),
    verified (``verify``; ``hashes=False`` checks sizes only)."""
    root = run_dir / "checkpoints"
    if spec == "none":
        if complete_checkpoints(root):
            raise CheckpointError(
                f"--resume none, but {root} already holds checkpoints; resume with --resume auto, or give "
                "another train.run_dir for a fresh run"
            )
        return None
    if spec == "auto":
        return newest_intact(root, hashes)
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"--resume {spec}: no such file or directory")
    if is_complete(path):
        problem = verify(path, hashes)
        if problem is not None:
            raise CheckpointError(f"--resume {spec}: {problem}; resume from an earlier checkpoint")
        return path
    for candidate_root in (path, path / "checkpoints"):
        found = newest_intact(candidate_root, hashes) if candidate_root.is_dir() else None
        if found is not None:
            return found
    marker_hint = " (it has no COMPLETE marker: the save was interrupted)" if (path / META).exists() or any(
        path.glob("*model_states.pt")
    ) else ""
    raise CheckpointError(
        f"--resume {spec}: not a complete af_train checkpoint, checkpoints directory or run directory{marker_hint}"
    )


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{ckpt / META} cannot be read ({exc}); the checkpoint is damaged") from None


def _recorded_files(ckpt: Path) -> list[str]:
    """Files of a checkpoint that ``af_meta.json`` describes (everything but itself and the marker)."""
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name not in (META, MARKER))


def describe_files(ckpt: Path, rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """Collective: ``{relative path: {"size", "xxh64"}}`` of a checkpoint's files; the ranks share the hashing."""
    names = broadcast_from_rank0(_recorded_files(ckpt) if rank == 0 else None) if world_size > 1 \
        else _recorded_files(ckpt)
    mine = {}
    for name in names[rank::world_size]:
        with contextlib.suppress(OSError):  # (not visible here: rank 0 hashes it below)
            mine[name] = {"size": (ckpt / name).stat().st_size, "xxh64": xxh64_file(ckpt / name)}
    parts = gather_objects(mine) if world_size > 1 else [mine]
    described = {name: value for part in parts for name, value in part.items()}
    if rank == 0:
        for name in names:
            if name not in described:
                described[name] = {"size": (ckpt / name).stat().st_size, "xxh64": xxh64_file(ckpt / name)}
    return dict(sorted(described.items()))


def verify(ckpt: Path, hashes: bool = True) -> str | None:
    """None if every file recorded at save has its size (and xxh64 with ``hashes``), else a sentence
    naming the checkpoint and the first damaged file."""
    try:
        recorded = read_meta(ckpt).get("files")
    except CheckpointError as exc:
        return str(exc)
    if recorded is None:
        log.info("%s records no file sizes or hashes (saved by an earlier af_train); not verified", ckpt)
        return None
    for name, expected in recorded.items():
        path = ckpt / name
        if not path.is_file():
            return f"checkpoint {ckpt} is damaged: {path} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return (f"checkpoint {ckpt} is damaged: {path} has {size} bytes, {expected['size']} were recorded at "
                    "save (truncated or replaced)")
        if hashes and xxh64_file(path) != expected["xxh64"]:
            return (f"checkpoint {ckpt} is damaged: {path} does not match the xxh64 recorded at save (its contents "
                    "changed after the checkpoint was written)")
    return None


def consolidated_state(ckpt: Path, raw: bool = False, own_run: bool = False) -> dict[str, torch.Tensor]:
    """fp32 module weights of a complete checkpoint (one process, CPU), read without unpickling code.

    Every file is checked against the sizes (and xxh64) recorded in ``af_meta.json`` first, then read with
    ``torch.load(weights_only=True)`` and the allow-list of ``load_allowing_deepspeed``: ZeRO 0-2 are
    consolidated here. ZeRO-3 partitions are consolidated by DeepSpeed's ``zero_to_fp32``, which unpickles:
    only with ``own_run`` (the training process reading the checkpoints it wrote); a shared ZeRO-3 run is
    read through the ``model.safetensors`` weights written at its end.

    A run with ``train.ema_decay`` evaluates its weight average: it replaces the trained weights here
    unless ``raw``. DeepSpeed leaves frozen parameters out of ZeRO-1 checkpoints; callers holding the
    live module complete them from it.
    """
    problem = verify(ckpt, hashes=not own_run)  # (the own run's files were just written: their sizes suffice)
    if problem is not None:
        raise CheckpointError(f"{problem}; use another checkpoint")
    stage = read_meta(ckpt)["zero_stage"]
    if stage == 0:  # no partitions: the module states file holds every weight
        model_states = load_allowing_deepspeed(ckpt / "mp_rank_00_model_states.pt")
        state = {k: v.float() for k, v in model_states["module"].items()}
    elif stage in (1, 2):
        state = _merge_zero12(ckpt, load_allowing_deepspeed(ckpt / "mp_rank_00_model_states.pt"))
    elif own_run:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:
        raise CheckpointError(
            f"{ckpt} is a ZeRO-3 checkpoint, whose partitions only DeepSpeed's unpickling reader consolidates; "
            "load the run's final/model.safetensors or best/model.safetensors instead (written at the end of a run)"
        )
    average = None if raw else read_weight_average(ckpt)
    return state if average is None else {**state, **average}


def _merge_zero12(ckpt: Path, model_states: dict[str, Any]) -> dict[str, torch.Tensor]:
    """ZeRO-1/2: each rank's optimizer file holds its slice of every parameter group's flat fp32 vector;
    concatenated in rank order, a group's vector holds its parameters in ``param_shapes`` order (each
    followed by its alignment padding), then padding."""
    files = sorted(ckpt.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_zero_rank)
    if not files:
        raise CheckpointError(f"{ckpt} has no zero_pp_rank_*_optim_states.pt files: the checkpoint is damaged")
    partitions = [load_allowing_deepspeed(f)["optimizer_state_dict"] for f in files]
    world = len(files)
    if any(p["partition_count"] != [world] * len(p["partition_count"]) for p in partitions):
        raise CheckpointError(f"{ckpt}: {world} optimizer partition files but partition counts "
                              f"{partitions[0]['partition_count']}; files are missing")
    paddings = partitions[0].get("param_alignment_paddings")
    state = {}
    for group, shapes in enumerate(model_states["param_shapes"]):
        flat = torch.cat([p["single_partition_of_fp32_groups"][group] for p in partitions])
        offset = 0
        for index, (name, shape) in enumerate(shapes.items()):
            numel = int(torch.Size(shape).numel())
            state[name] = flat.narrow(0, offset, numel).view(shape).clone()
            offset += numel + (int(paddings[group][index]) if paddings else 0)
        if offset > flat.numel():
            raise CheckpointError(f"{ckpt}: parameter group {group} needs {offset} values, its partitions hold "
                                  f"{flat.numel()}; the checkpoint is damaged")
    module = model_states["module"]
    state.update({name: module[name] for name in model_states.get("buffer_names") or [] if name in module})
    fragments = model_states.get("frozen_param_fragments") or {}  # ZeRO-2 saves frozen parameters whole
    state.update({name: fragments[name].float() for name in model_states.get("frozen_param_shapes") or {}
                  if name in fragments})
    state.update({alias: state[name] for alias, name in (model_states.get("shared_params") or {}).items()
                  if name in state})
    return state


def _zero_rank(path: Path) -> int:
    return int(path.name.split("zero_pp_rank_")[1].split("_")[0])


class _Opaque:
    """Stand-in for DeepSpeed's bookkeeping objects (loss scaler, stage enum, fragment addresses): their
    state is kept as plain data and no DeepSpeed code runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


_DEEPSPEED_OBJECTS = (  # what DeepSpeed 0.19 pickles into its checkpoint files besides tensors and plain values
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _allowed_globals() -> list[Any]:
    """The explicit allow-list: DeepSpeed's objects as ``_Opaque`` and the numpy pieces of an RNG state."""
    import numpy as np

    numpy_parts = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np.dtypes.Int64DType, np.dtypes.Float64DType,
                   (np._core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
                   (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    return [*numpy_parts, *((_Opaque, name) for name in _DEEPSPEED_OBJECTS)]


def load_allowing_deepspeed(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a checkpoint file with ``_allowed_globals``: anything else
    pickled in it (code) is refused with a ``CheckpointError`` naming the file."""
    import pickle

    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} holds pickled objects outside the allow-list of tensors, plain values and "
                              f"DeepSpeed's bookkeeping ({first_line}); not loaded") from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]}); the "
                              "checkpoint is damaged") from None


def read_weight_average(ckpt: Path) -> dict[str, torch.Tensor] | None:
    """The float32 weight average (``af_train.ema.EMA.state_dict``'s ``weights``) saved in a checkpoint;
    None when the run had no ``train.ema_decay``."""
    state = load_rank_state(ckpt, 0).get(EMA_KEY)
    return None if state is None else {n: t.float() for n, t in state["weights"].items()}


def rank_file(ckpt: Path, rank: int) -> Path:
    """Where ``rank``'s own state (RNG, loader position; rank 0: the weight average) lives in ``ckpt``."""
    return ckpt / RANK_DIR / f"rank_{rank:05d}.pt"


def load_rank_state(ckpt: Path, rank: int) -> dict[str, Any]:
    path = rank_file(ckpt, rank)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint was saved with fewer ranks or is damaged")
    return load_allowing_deepspeed(path)  # RNG states hold numpy arrays and tuples: allow-listed, no code


# --------------------------------------------------------------------------------------------------
# Retention
# --------------------------------------------------------------------------------------------------


def prune(root: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the last ``keep_last`` (keeping the best) and partial ones older
    than the newest complete checkpoint, with their universal forms (one process: rank 0's job)."""
    complete = complete_checkpoints(root)
    keep = {p.name for p in complete[-keep_last:]}
    best = read_best(root)
    if best is not None:
        keep.add(best[0])
    newest = step_of(complete[-1].name) if complete else None
    for path in sorted(root.iterdir()):
        step = step_of(path.name.removesuffix(UNIVERSAL_SUFFIX))
        if step is None or not path.is_dir():
            continue
        base = path.name.removesuffix(UNIVERSAL_SUFFIX)
        if base in keep:
            continue
        partial_and_old = not is_complete(root / base) and newest is not None and step < newest
        if is_complete(root / base) or partial_and_old:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed checkpoint %s (train.keep_last=%d)", path, keep_last)


# --------------------------------------------------------------------------------------------------
# Universal checkpoints (resuming at another data-parallel world size)
# --------------------------------------------------------------------------------------------------


def convert_to_universal(ckpt: Path, rank: int, out_root: Path) -> Path:
    """Collective: rank 0 converts ``ckpt`` with DeepSpeed's ds_to_universal into ``out_root`` (once).

    ``out_root`` is the resuming run's checkpoints directory, so a checkpoint of another run is
    only read, never written to.
    """
    out = out_root / f"{ckpt.name}{UNIVERSAL_SUFFIX}"
    if rank == 0:
        out_root.mkdir(parents=True, exist_ok=True)
    done = out / MARKER
    if rank == 0 and not done.is_file():
        shutil.rmtree(out, ignore_errors=True)
        command = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
            "--input_folder", str(ckpt), "--output_folder", str(out), "--inject_missing_state",
            "--num_extract_workers", "1", "--num_merge_workers", "1",
        ]
        log.info("converting %s to DeepSpeed's universal format: %s", ckpt, " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise CheckpointError(
                f"converting {ckpt} to a universal checkpoint failed (exit {result.returncode}):\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
            )
        for name in (RANK_DIR, META):  # our state travels with it
            source = ckpt / name
            if source.is_dir():
                shutil.copytree(source, out / name)
            else:
                shutil.copy2(source, out / name)
        atomic_write(done, "complete\n")
    barrier()
    if not done.is_file():
        raise CheckpointError(f"universal conversion of {ckpt} did not complete (see rank 0's log)")
    return out


