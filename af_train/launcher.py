"""The one way af_train's multi-process commands start their ranks: the DeepSpeed launcher.

``af-train`` and ``af-prepare`` share these options. With ``--hostfile`` the launcher reaches the hosts
over ssh/pdsh (or, with ``--no_ssh``, starts only this node's ranks: one launcher per node, e.g. under
``srun``); without, it runs locally on ``--num_gpus`` GPUs (default: all visible) or ``--num_cpu_ranks``
CPU processes. The launched module finds its rank with ``af_train.distributed.launch_placement``.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
from typing import IO, Any

LAUNCHER_OPTIONS = ("hostfile", "num_gpus", "num_cpu_ranks", "master_port", "master_addr", "no_ssh", "node_rank")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_launcher_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--hostfile", help="DeepSpeed hostfile (hostname slots=N per line); omitted: this machine only")
    parser.add_argument("--num_gpus", "--num-gpus", type=int, help="GPUs on this machine (default: all visible)")
    parser.add_argument("--num_cpu_ranks", "--num-cpu-ranks", type=int,
                        help="CPU processes when there is no GPU (gloo); default 1")
    parser.add_argument("--master_port", "--master-port", type=int, help="rendezvous port (default: a free one)")
    parser.add_argument("--master_addr", "--master-addr", help="with --hostfile: address of the first host")
    parser.add_argument("--no_ssh", "--no-ssh", action="store_true",
                        help="with --hostfile: start only this node's ranks (run one launcher per node, e.g. "
                             "under srun); needs --node_rank and --master_addr")
    parser.add_argument("--node_rank", "--node-rank", type=int,
                        help="with --no_ssh: this node's line in the hostfile, from 0 (SLURM: $SLURM_NODEID)")


def check_launcher_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` (exit 2) on a combination the launcher cannot run."""
    if args.no_ssh and not args.hostfile:
        parser.error("--no_ssh is for multi-node runs with --hostfile; on one machine the launcher never uses ssh")
    if args.no_ssh and (args.node_rank is None or not args.master_addr):
        parser.error("--no_ssh needs --node_rank N (this node's line in the hostfile, from 0) and "
                     "--master_addr HOST (the node of rank 0), the same on every node")
    if args.node_rank is not None and not args.no_ssh:
        parser.error("--node_rank only applies with --hostfile --no_ssh (one launcher per node)")
    for name in ("num_gpus", "num_cpu_ranks"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")


def wants_launcher(args: argparse.Namespace) -> bool:
    """True when the options ask for ranks (a hostfile, GPUs or CPU ranks)."""
    return bool(args.hostfile or args.num_gpus or args.num_cpu_ranks)


def launcher_command(args: argparse.Namespace, module: str, rest: list[str]) -> list[str]:
    """The ``deepspeed`` command that runs ``python -m module *rest`` on every rank the options name."""
    deepspeed = shutil.which("deepspeed")
    command = [deepspeed] if deepspeed else [sys.executable, "-m", "deepspeed.launcher.runner"]
    if args.hostfile:
        command += ["--hostfile", args.hostfile]
        if args.no_ssh:  # one launcher per node, started by the user (e.g. srun): this node's rank
            command += ["--no_ssh", "--node_rank", str(args.node_rank)]
        if args.master_addr:
            command += ["--master_addr", args.master_addr]
    else:
        ranks = args.num_gpus or args.num_cpu_ranks
        if ranks is None:
            import torch

            ranks = torch.cuda.device_count() or 1
        command += ["--no_ssh", "--node_rank", "0", "--master_addr", "127.0.0.1", "--num_gpus", str(ranks)]
    command += ["--master_port", str(args.master_port or free_port())]
    command += ["--module", module]
    return command + rest


def nested_launch_problem(placement: Any) -> str | None:
    """The refusal of launcher options in a process a launcher already started (``placement``: its
    ``distributed.LaunchPlacement``), or None."""
    if placement.launcher == "none":
        return None
    return (f"--hostfile, --num_gpus and --num_cpu_ranks start a launcher; this process already runs under one "
            f"({placement.launcher}, rank {placement.rank} of {placement.world_size}): leave them out")


def start_launcher(prog: str, module: str, argv: list[str], stream: IO[str] | None = None) -> int:
    """Run ``python -m module`` on every rank the launcher options in ``argv`` name, with the rest of ``argv``;
    the command is printed to ``stream`` (default stdout) first. Returns the launcher's exit status."""
    launcher_parser = argparse.ArgumentParser(prog=prog, add_help=False)
    add_launcher_arguments(launcher_parser)
    launcher_args, rest = launcher_parser.parse_known_args(argv)
    command = launcher_command(launcher_args, module, rest)
    print(f"{prog}:", " ".join(command), file=stream or sys.stdout, flush=True)
    return subprocess.call(command)
