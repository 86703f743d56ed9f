"""tools/benchmark_kernels.py: CLI parsing, and the CPU smoke run end to end (interpreter)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "benchmark_kernels.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_kernels_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_help_and_argument_errors(capsys):
    tool = _load_tool()
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--help"])
    assert exit_info.value.code == 0
    assert "--device" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        tool.parse_args(["--kernels", "rope,flash"])
    assert exit_info.value.code == 2
    assert "unknown ['flash']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.parse_args(["--mpc-sizes", "1k,2k"])
    args = tool.parse_args(["--kernels", "mpc", "--mpc-sizes", "1024,65536"])
    assert args.kernels == ["mpc"] and args.mpc_sizes == [1024, 65536]


def test_targets_and_oom_rows_are_reported_not_crashed():
    tool = _load_tool()
    model = "x".join(map(str, tool.MODEL_SHAPE))
    rows = [
        {"kernel": "attention", "shape": model, "impl": "triton", "mode": "full", "status": "ok", "ms": 2.0},
        {"kernel": "attention", "shape": model, "impl": "rope+sdpa_flash", "mode": "full", "status": "ok", "ms": 3.0},
        {"kernel": "mpc", "shape": "N=8192,D=768", "impl": "triton", "mode": "full", "status": "ok", "ms": 5.0},
        {"kernel": "mpc", "shape": "N=8192,D=768", "impl": "eager", "mode": "full", "status": "ok", "ms": 4.0},
        {"kernel": "mpc", "shape": "N=65536,D=768", "impl": "triton", "mode": "full", "status": "ok", "ms": 90.0,
         "peak_mem_mb": 700.0},
        {"kernel": "mpc", "shape": "N=65536,D=768", "impl": "eager", "mode": "full", "status": "oom"},
    ]
    tool.add_speedups(rows)
    assert rows[1]["triton_speedup"] == pytest.approx(1.5)
    assert "triton_speedup" not in rows[5]
    targets = tool.check_targets(rows, {"bandwidth_gbps": 1.0, "matmul_tflops": 1.0})
    assert targets["attention_full_vs_rope+sdpa_flash>=1.15x"]["met"] is True
    assert targets["mpc_N8192_time<=1.3x_naive"] == {"value": pytest.approx(1.25), "met": True}
    assert targets["mpc_N65536_peak_mem<1GB"]["met"] is True
    assert tool._is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB"))
    assert not tool._is_oom(ValueError("shape mismatch"))


def test_cpu_smoke_run_writes_csv_json_and_png(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out), "--cpu-repeats", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with open(out / "kernels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["kernel"] for r in rows} == {"rope", "attention", "mpc"}
    for kernel in ("rope", "attention", "mpc"):
        triton_rows = [r for r in rows if r["kernel"] == kernel and r["impl"] == "triton"]
        assert sorted(r["mode"] for r in triton_rows) == ["bwd", "full", "fwd"]
        for r in triton_rows:
            assert r["status"] == "ok", r
            assert float(r["ms"]) > 0 and float(r["value"]) > 0
            assert float(r["max_abs_err"]) < 1e-4  # the benchmark checked the kernel against the reference
        assert any(r["impl"] == "eager" and r["status"] == "ok" for r in rows if r["kernel"] == kernel)
    assert any(r["impl"] == "rope+sdpa" for r in rows if r["kernel"] == "attention")

    report = json.loads((out / "kernels.json").read_text())
    meta = report["meta"]
    assert meta["smoke_run"] is True and "Triton interpreter" in meta["device"]
    assert meta["torch"] == torch.__version__ and meta["triton"] == triton.__version__
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", meta["git"]["commit"])
    assert meta["date_utc"].startswith("20") and meta["peaks"]["bandwidth_gbps"] > 0
    assert len(report["rows"]) == len(rows)

    png = (out / "kernels.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
