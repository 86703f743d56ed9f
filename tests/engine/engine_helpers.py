"""Helpers for the engine tests: the real ``deepspeed`` launcher, process groups, /dev/shm cleanup."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny_pretrain.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


USED_PORTS: list[int] = []  # master ports of launched jobs; conftest releases their /dev/shm buffers


def release_shm(port: int) -> None:
    """DeepSpeed's CPU all-reduce leaves ~66 MB /dev/shm buffers named after the master port."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"):
        with contextlib.suppress(OSError):
            os.unlink(path)


RANK_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def single_process_rank():
    """This process as a 1-rank job (rank env vars, one torch thread) for an in-process Trainer; the
    environment, the thread count and DeepSpeed's /dev/shm buffers are restored or released after."""
    import torch

    saved = {k: os.environ.get(k) for k in RANK_ENV_KEYS}
    port = free_port()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        release_shm(port)


def base_overrides(data: Path, run_dir: Path) -> list[str]:
    """The tiny pretraining recipe on the synthetic shards, sized for 2 CPU cores."""
    return [
        f"data.train={data / 'train'}", f"data.val={data / 'val'}", "data.max_length=32",
        f"train.run_dir={run_dir}", "train.log_every=1", "train.micro_batch_size=4",
        "train.record_sample_ids=true", "optim.warmup_steps=2", "optim.lr=3e-3", "optim.schedule=constant",
        # No dropout: runs at other world sizes draw other dropout masks; RNG restore is tested in-process.
        "model.hidden_dropout_prob=0.0", "train.best_metric=null", "train.eval_every=0",
    ]


def launcher_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": "1",  # 2 shared cores: more threads per rank only contend
        "PYTHONPATH": f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def launch_command(ranks: int, overrides: list[str], *, port: int, resume: str = "auto",
                   node_rank: int = 0, hostfile: Path | None = None, recipe: Path = TINY) -> list[str]:
    command = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile is not None:
        command += ["--hostfile", str(hostfile)]
    else:
        command += ["--num_gpus", str(ranks)]
    command += ["--no_ssh", "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                "--module", "af_train.train", "--recipe", str(recipe), "--resume", resume, *overrides]
    return command


SEQUENCE_WORKER = Path(__file__).with_name("sequence_rank_worker.py")


def run_sequence(ranks: int, runs: list[dict], log: Path, timeout: float = 400) -> None:
    """Several af_train.train runs one after another in one launch of ``ranks`` ranks (each run: ``overrides``,
    ``log``, optional ``resume``, as ``run`` takes them); the launcher's own output goes to ``log``."""
    plan = [{"argv": ["--recipe", str(TINY), "--resume", r.get("resume", "auto"), *r["overrides"]],
             "log": str(r["log"])} for r in runs]
    plan_file = log.with_suffix(".plan.json")
    plan_file.write_text(json.dumps(plan, indent=1))
    port = free_port()
    USED_PORTS.append(port)
    command = launch_command(ranks, [], port=port)
    command = command[:command.index("--module")] + [str(SEQUENCE_WORKER), "--plan", str(plan_file)]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=launcher_env(), cwd=REPO,
                                   start_new_session=True)
    wait(process, log, timeout)


def start(ranks: int, overrides: list[str], log: Path, *, resume: str = "auto", port: int | None = None,
          prefix: list[str] | None = None, **kwargs) -> subprocess.Popen:
    port = port or free_port()
    USED_PORTS.append(port)
    command = (prefix or []) + launch_command(ranks, overrides, port=port, resume=resume, **kwargs)
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=launcher_env(), cwd=REPO,
                                start_new_session=True)


def logged_steps(run_dir: Path) -> int:
    """The last step in a run's metrics.jsonl (0 if none); a line cut by a kill is ignored."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def wait(process: subprocess.Popen, log: Path, timeout: float = 240, expect_rc: int | None = 0) -> int:
    try:
        rc = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError(f"launcher timed out; log tail:\n{log.read_text(errors='replace')[-4000:]}") from None
    if expect_rc is not None and rc != expect_rc:
        raise AssertionError(f"launcher exit {rc} (expected {expect_rc}); log tail:\n"
                             f"{log.read_text(errors='replace')[-6000:]}")
    return rc


def run(ranks: int, overrides: list[str], log: Path, timeout: float = 240, expect_rc: int | None = 0,
        **kwargs) -> int:
    return wait(start(ranks, overrides, log, **kwargs), log, timeout, expect_rc)


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log else ""
            raise AssertionError(f"process ended (rc {process.returncode}) before {what}:\n{tail}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _live_members(pgid: int) -> list[int]:
    """Pids of the process group that are alive (zombies do not count: nobody may reap orphans here)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def wait_group_exit(process: subprocess.Popen, timeout: float) -> None:
    """Wait until no process of the launcher's process group (runner, launch.py, ranks) is left."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        process.poll()  # reap our direct child
        if not _live_members(process.pid):
            return
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError(f"processes {_live_members(process.pid)} of group {process.pid} still run after {timeout} s")


def signal_group(process: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 30,
                 missing_ok: bool = False) -> None:
    """Send ``sig`` to the launcher's whole process group (runner, launch.py, ranks: as kill -9, Ctrl-C
    or a scheduler would) and wait until no member is left. A group already gone raises
    ProcessLookupError unless ``missing_ok`` (clean-up after a test)."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        if not missing_ok:
            raise
    wait_group_exit(process, timeout)
    process.wait()


def batch_ids(run_dir: Path) -> dict[tuple[int, int], list[str]]:
    """(step, rank) -> clip ids of that rank's micro batches in that step."""
    out: dict[tuple[int, int], list[str]] = {}
    for path in sorted((run_dir / "sample_ids").glob("rank_*.jsonl")):
        rank = int(path.stem.split("_")[1])
        for line in path.read_text().splitlines():
            record = json.loads(line)
            out.setdefault((record["step"], rank), []).extend(record["ids"])
    return out
