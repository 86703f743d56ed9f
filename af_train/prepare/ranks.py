"""``af-prepare`` around the ranks: the resume state rank 0 establishes for all of them,
and the wait for the slowest part.

Which rank prepares which chunk is :mod:`~af_train.prepare.parts`; what each rank does with its chunks is
:mod:`~af_train.prepare.encoding`; the merge rank 0 does afterwards is :mod:`~af_train.prepare.merging`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from af_train import distributed
from af_train.prepare.parts import PrepareRefused
from af_train.prepare.remote_output import RemoteOutput
from af_train.prepare.writing import prepare_split_dir

log = logging.getLogger(__name__)


def _establish_outputs(overwrite: bool, remote_out: RemoteOutput | None, dirs: dict[str, Path], fingerprint: dict,
                       shown: dict[str, str]) -> dict[str, str]:
    """Check or create each split's resume state (rank 0 only with several ranks); raises ``PrepareRefused``
    (object storage) or ``SystemExit`` (the folder's refusals)."""
    from af_train.remote import RemoteError

    try:
        if remote_out:
            remote_out.check()
            for d in dirs.values():
                remote_out.pull(d, overwrite)
        states = {split: prepare_split_dir(d, fingerprint, overwrite, shown[split]) for split, d in dirs.items()}
        if remote_out:
            for split, d in dirs.items():
                if states[split] != "complete":
                    remote_out.push_state(d)
    except RemoteError as exc:
        raise PrepareRefused(f"af-prepare: error: {exc}") from None
    return states


def _establish_outputs_for_all_ranks(*args) -> dict[str, str]:
    """``_establish_outputs`` on rank 0 of several: a refusal becomes an exception every rank raises."""
    try:
        return _establish_outputs(*args)
    except SystemExit as exc:  # prepare_split_dir's refusals (another preparation's folder, other settings)
        raise PrepareRefused(str(exc.code)) from None


def establish_outputs(rank: int, world: int, overwrite: bool, remote_out: RemoteOutput | None,
                      dirs: dict[str, Path], fingerprint: dict, shown: dict[str, str]) -> dict[str, str]:
    """Each split's state ("fresh", "resume" or "complete"), the same on every rank: rank 0 checks and creates
    the resume state, then every rank starts from it. Raises ``PrepareRefused`` (with several ranks, on all of
    them) or, with one rank, ``SystemExit`` for the folder's refusals."""
    if world == 1:
        return _establish_outputs(overwrite, remote_out, dirs, fingerprint, shown)
    states = distributed.broadcast_from_rank0(distributed.result_or_exception(
        _establish_outputs_for_all_ranks, overwrite, remote_out, dirs, fingerprint, shown) if rank == 0 else None)
    if rank != 0 and remote_out:
        for split, d in dirs.items():  # this rank's staging folder follows the bucket
            remote_out.pull(d, overwrite=False)
            prepare_split_dir(d, fingerprint, False, shown[split])
    return states


def wait_for_all_ranks(rank: int, world: int, own_code: int, timings: dict) -> int:
    """Collective, after each rank's part: the worst exit code of the other ranks (0 when all finished);
    rank 0 logs the whole job's rate, or which ranks did not finish."""
    statuses = distributed.gather_objects({"rank": rank, "code": own_code, **timings})
    failed = [s for s in statuses if s["code"] != 0]
    if rank == 0 and failed:
        print(f"af-prepare: error: rank(s) {', '.join(str(s['rank']) for s in failed)} did not finish their part; "
              "committed chunks are kept; rerun the same command to continue", file=sys.stderr)
    elif rank == 0:
        clips, slowest = sum(s["clips"] for s in statuses), max(s["elapsed_s"] for s in statuses)
        log.info("all %d ranks: %d clips in %.1f s (%.2f clips/s)", world, clips, slowest, clips / max(slowest, 1e-9))
    return max((s["code"] for s in failed if s["rank"] != rank), default=0)
