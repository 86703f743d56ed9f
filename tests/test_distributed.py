"""distributed.ranks_leave_together: the ranks that finished first wait for rank 0's last work (a merge)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

WORK_S = 1.0  # rank 0's "merge"


def _rank(rank: int, port: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    from af_train import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    times: dict[str, float] = {}

    def left(name: str) -> None:
        times[name] = time.time()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(times))

    with distributed.ranks_leave_together(2):  # rank 0 works; rank 1 has nothing left to do
        if rank == 0:
            time.sleep(WORK_S)
            times["work_done"] = time.time()
    left("after_work")

    try:
        with distributed.ranks_leave_together(2):  # rank 0's work fails: rank 1 is released all the same
            if rank == 0:
                time.sleep(WORK_S)
                times["raised"] = time.time()
                raise ValueError("merge failed")
    except ValueError:
        pass
    left("after_raise")

    with distributed.ranks_leave_together(2):  # rank 0 is killed mid-work: rank 1 does not wait for the timeout
        if rank == 0:
            left("killed")
            os._exit(9)
    left("after_kill")
    os._exit(0)  # the group is broken: no teardown


def test_ranks_leave_after_rank0s_work_also_when_it_raises_or_dies(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(rank, port, str(tmp_path))) for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        if proc.is_alive():
            proc.kill()
    assert [p.exitcode for p in procs] == [9, 0]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank1["after_work"] >= rank0["work_done"]  # rank 1 did not leave while rank 0 worked
    assert rank1["after_raise"] >= rank0["raised"]
    assert rank1["after_kill"] - rank0["killed"] < 30  # not the 60-s collective timeout
