"""Entry point: train AudioFormer from a recipe.

Under the DeepSpeed launcher (one process per GPU, or per CPU rank)::

    deepspeed --hostfile hostfile af_train/train.py --recipe recipes/ft1_audioset20k.yaml [key=value ...]
    deepspeed --num_gpus 8 --no_ssh --node_rank 0 --master_addr 127.0.0.1 af_train/train.py --recipe ...

As a single process (no launcher): ``python -m af_train.train --recipe ...``.

The ``af-train`` console script starts the launcher for you: with ``--hostfile`` it runs
``deepspeed --hostfile ...`` (ssh/pdsh to the hosts); without, it runs locally with ``--no_ssh`` on
``--num_gpus`` GPUs (default: all visible) or ``--num_cpu_ranks`` CPU processes when there is no GPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

if __package__ in (None, ""):  # run as a script path (deepspeed af_train/train.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _single_process_env() -> None:
    """Without a launcher, run as rank 0 of 1 (DeepSpeed otherwise looks for MPI)."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ or "SLURM_PROCID" in os.environ:
        return
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_SIZE": "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from af_train.launcher import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="af_train.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="recipe YAML (recipes/*.yaml)")
    parser.add_argument("--resume", default="auto",
                        help="auto (latest complete checkpoint of the run directory, if any) | none | a checkpoint, "
                             "checkpoints or run directory")
    parser.add_argument("--skip-checkpoint-hashes", action="store_true",
                        help="before resuming, check only the sizes of the checkpoint's files, not their xxh64 "
                             "hashes (faster on very large checkpoints)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="recipe overrides key.sub=value, e.g. train.max_steps=100")
    return parser.parse_args(argv)


def kernels_override(environ: Mapping[str, str]) -> list[str]:
    """``model.kernels=<AF_KERNELS>`` when that debugging variable is set, else nothing. Read here, once per
    run, it becomes the recipe's kernels choice (applied last: it wins over the recipe and the command line)
    and is logged with the resolved recipe."""
    from af_train.config import RecipeError
    from kernels.dispatch import backend_from_environment

    try:
        backend = backend_from_environment(environ)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    return [] if backend is None else [f"model.kernels={backend}"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from af_train.config import Recipe, RecipeError

    try:
        recipe = Recipe.load(args.recipe, [*args.overrides, *kernels_override(os.environ)])
    except RecipeError as exc:
        print(f"af_train.train: {exc}", file=sys.stderr)
        return 2
    _single_process_env()
    from af_train.checkpoint import CheckpointError
    from af_train.data.manifests import DataError
    from af_train.engine import EXIT_NONFINITE, Trainer, TrainingStopped

    try:
        trainer = Trainer(recipe, resume=args.resume, verify_hashes=not args.skip_checkpoint_hashes)
    except (DataError, CheckpointError) as exc:  # the user's data or checkpoint: one line per rank, no traceback
        rank = os.environ.get("RANK")
        print(f"af_train.train: error{f' (rank {rank})' if rank else ''}: {exc}", file=sys.stderr)
        return 2
    try:
        trainer.fit()
    except TrainingStopped:
        return EXIT_NONFINITE
    finally:
        trainer.close()
    return 0


# --------------------------------------------------------------------------------------------------
# af-train: the launcher wrapper
# --------------------------------------------------------------------------------------------------


def preflight(rest: list[str]) -> str | None:
    """What would stop every rank at start-up, found before the launcher starts any: the recipe, and the
    splits' manifests (another tokenizer's val/test codes, and when fine-tuning another class list, are
    refused; clip lengths that differ are warned)."""
    from af_train.config import Recipe, RecipeError
    from af_train.data.splits import DataError, preflight_splits  # no streaming: the pre-flight stays quick

    args = parse_args(rest)
    try:
        recipe = Recipe.load(args.recipe, [*args.overrides, *kernels_override(os.environ)])
        for warning in preflight_splits(recipe.data, same_labels=recipe.objective.mode != "pretrain"):
            print(f"af-train: warning: {warning}", file=sys.stderr)
    except (RecipeError, DataError) as exc:
        return str(exc)
    return None


def launch_main(argv: list[str] | None = None) -> int:
    from af_train.launcher import add_launcher_arguments, check_launcher_arguments, launcher_command

    parser = argparse.ArgumentParser(
        prog="af-train",
        description="Start the DeepSpeed launcher for af_train.train (all other arguments go to af_train.train: "
                    "--recipe FILE [--resume ...] [key=value ...]).")
    add_launcher_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the launcher command and exit")
    args, rest = parser.parse_known_args(argv)
    if "--recipe" not in rest:
        parser.error("--recipe FILE is required (it is passed to af_train.train)")
    check_launcher_arguments(parser, args)
    command = launcher_command(args, "af_train.train", rest)
    print("af-train:", " ".join(command), flush=True)
    if args.dry_run:
        return 0
    if problem := preflight(rest):
        print(f"af-train: error: {problem}", file=sys.stderr)
        return 2
    # Each CPU rank's torch thread count is shared out by the Trainer (cores / local ranks), whatever launched it.
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
