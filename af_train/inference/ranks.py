"""``af-embed`` and ``af-predict`` on several ranks: who takes which input, starting the ranks, and the end of a job.

The launcher options are af-train's and af-prepare's (:mod:`af_train.launcher`): ``--num_cpu_ranks N``,
``--num_gpus N`` or ``--hostfile`` start the DeepSpeed launcher, which runs the command again as
``python -m <module>`` on every rank; ``torchrun`` and ``srun`` start the ranks themselves
(:func:`af_train.distributed.launch_placement` reads either). Input ``k`` (from 0, in the order the
inputs are listed) belongs to rank ``k mod world_size`` (:data:`RANK_RULE`): interleaving balances the
ranks when a listing is sorted with the long files together. Every rank decodes and runs the model on
its own device (``cuda:LOCAL_RANK`` when there are GPUs), writes its own part, and reports to rank 0,
which merges the parts in input order once every rank has reported, or names the ranks that failed.

Nothing here imports torch at module level: the commands answer ``--help`` and argument errors first.
"""

from __future__ import annotations

import argparse
import socket
from typing import TYPE_CHECKING, Any

from af_train.inference.cli_common import positive_int
from af_train.launcher import add_launcher_arguments, check_launcher_arguments, nested_launch_problem, wants_launcher

if TYPE_CHECKING:
    from af_train.distributed import LaunchPlacement

RANK_RULE = "input k (from 0, in the order the inputs are listed) belongs to rank k mod world_size"


def add_rank_arguments(parser: argparse.ArgumentParser) -> None:
    """The launcher options, the wait for the other ranks, and the launcher's own ``--local_rank``."""
    group = parser.add_argument_group("several ranks (as af-train and af-prepare: the DeepSpeed launcher; "
                                      "torchrun and srun work too)")
    add_launcher_arguments(group)
    group.add_argument("--threads", type=positive_int,
                       help="torch threads per rank (default: torch's own with one rank per machine, else the "
                            "rank's share of the CPU cores)")
    group.add_argument("--wait-hours", type=float, default=72.0,
                       help="how long a rank that has finished its part waits for the others (default 72)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def rank_indices(count: int, rank: int, world_size: int) -> list[int]:
    """The inputs (indices into the listing of ``count``) that are ``rank``'s part (:data:`RANK_RULE`)."""
    return list(range(rank, count, world_size))


def launch_requested(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """Whether the options ask to start ranks (``parser.error`` when they cannot: already under a launcher,
    or an impossible combination). Call after the cheap argument checks: this imports torch."""
    check_launcher_arguments(parser, args)  # also --no_ssh or --node_rank alone: they ask for a launcher
    if not wants_launcher(args):
        return False
    from af_train import distributed

    try:
        placement = distributed.launch_placement()
    except ValueError as exc:
        parser.error(str(exc))
    if problem := nested_launch_problem(placement):
        parser.error(problem)
    return True


def join_ranks(args: argparse.Namespace, prog: str) -> LaunchPlacement:
    """This process's ``LaunchPlacement``, with its process group joined when there are several ranks.

    Each rank gets its own GPU (``cuda:LOCAL_RANK``) unless ``--device`` says otherwise, and its share of
    the CPU cores for torch's threads when several ranks share a machine (``--threads`` overrides). Raises
    ``SystemExit`` with a message naming the fix when the launcher's environment is incomplete."""
    import torch

    from af_train import distributed

    try:
        placement = distributed.launch_placement()
    except ValueError as exc:
        raise SystemExit(f"{prog}: error: {exc}") from None
    if placement.world_size > 1 and args.device is None and torch.cuda.is_available():
        args.device = f"cuda:{placement.local_rank % torch.cuda.device_count()}"
    if args.threads:
        torch.set_num_threads(args.threads)
    elif placement.local_world_size > 1:
        torch.set_num_threads(distributed.cores_per_rank(placement.local_world_size))
    try:
        distributed.init_from_environment(placement, args.wait_hours * 3600)
    except ValueError as exc:
        raise SystemExit(f"{prog}: error: {exc}") from None
    return placement


def leave_ranks(placement: LaunchPlacement) -> None:
    """Leave the process group ``join_ranks`` joined (none for one process: a group the caller holds stays up)."""
    from af_train import distributed

    if placement.world_size > 1:
        distributed.shutdown()


def report_to_rank0(status: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Collective, after each rank's part: every rank's ``status`` in rank order, or None when a rank stopped
    without reporting (the process group broke: a rank was killed or lost)."""
    from af_train import distributed

    try:
        return distributed.gather_objects({"host": socket.gethostname(), **status})
    except RuntimeError:  # gloo/NCCL: a peer closed its connection
        return None


def wait_for_rank0() -> None:
    """Collective: a failing rank waits here until rank 0 has said which ranks failed (the launcher stops the
    others as soon as one rank exits non-zero)."""
    from af_train import distributed

    distributed.barrier_unless_broken()


def failed_ranks_message(prog: str, statuses: list[dict[str, Any]]) -> str | None:
    """One error naming every rank whose ``code`` is not 0 and why, or None when all finished."""
    failed = [s for s in statuses if s["code"] != 0]
    if not failed:
        return None
    reasons = "; ".join(f"rank {s['rank']} on {s['host']}: {s.get('error') or 'failed'}" for s in failed)
    return f"{prog}: error: rank(s) {', '.join(str(s['rank']) for s in failed)} did not finish their part ({reasons})"
