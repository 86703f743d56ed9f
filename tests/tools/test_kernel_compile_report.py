"""tools/kernel_compile_report.py: the kernels compiled for sm_90 as a real launch specialises them
(the CI subset), checked without a GPU through Triton's compiler and its bundled ptxas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from af_train_tools import kernel_compile_report as report

REPO = Path(__file__).resolve().parents[2]
FIELDS = {"kernel", "variant", "config", "status", "shared_bytes", "registers", "spill_bytes", "tensor_core",
          "pruned", "cvt_rna"}
MODEL = "dtype=bf16,head_dim=64,interleaved=on,mask=on"


def _run(tmp_path, *argv, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "af_train_tools.kernel_compile_report", *argv], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1700)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ci_subset_compiles_every_model_config_without_failures(tmp_path):
    out = tmp_path / "kernel_compile.json"
    proc = _run(tmp_path, "--ci", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows and all(set(row) == FIELDS for row in rows)
    assert all(row["status"] in ("ok", "out_of_resources") or row["status"].startswith("error: ") for row in rows)
    assert {row["kernel"] for row in rows} == {
        "_rotary_kernel", "_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel",
        "_attn_bwd_dq_kernel", "_keep_mask_kernel", "_mpc_lse_fwd_kernel", "_mpc_lse_bwd_kernel"}
    assert report.failures(rows) == []
    # the model's own variants: every config compiled, and each kernel has a zero-spill wgmma config
    for kernel, configs in (("_attn_fwd_kernel", 6), ("_attn_bwd_dkdv_kernel", 6), ("_attn_bwd_dq_kernel", 6)):
        for dropout in ("on", "off"):
            variant = f"{MODEL},dropout={dropout}"
            mine = [row for row in rows if row["kernel"] == kernel and row["variant"] == variant]
            assert len(mine) == configs, (kernel, variant, len(mine))
            assert any(row["status"] == "ok" and row["spill_bytes"] == 0 and row["tensor_core"] == "wgmma"
                       and not row["pruned"] for row in mine), (kernel, variant)
    # the MPC backward rounds its weights to TF32 to nearest in the PTX; every config at D = 768 is there
    mpc_bwd = [row for row in rows if row["kernel"] == "_mpc_lse_bwd_kernel" and row["variant"] == "dim=768"]
    assert len(mpc_bwd) == 5 and all(row["cvt_rna"] for row in mpc_bwd if row["status"] == "ok")
    # BLOCK_DOUT must divide D = 768 in every config the tuner may pick
    for row in mpc_bwd:
        block_dout = int(row["config"].split("BLOCK_DOUT=")[1].split(",")[0])
        assert row["pruned"] or 768 % block_dout == 0, row
    # the other variants: at least one config each (one per attention variant and kernel)
    assert len({row["variant"] for row in rows if row["kernel"] == "_attn_fwd_kernel"}) == 48


def test_failures_flag_errors_of_configs_the_tuner_can_pick():
    rows = [{"status": "ok", "pruned": False}, {"status": "out_of_resources", "pruned": True},
            {"status": "error: CompilationError: x", "pruned": False}, {"status": "out_of_resources", "pruned": False}]
    assert report.failures(rows) == rows[2:]


CAPTURE = r"""
import json
from af_train_tools import kernel_compile_report as report
from kernels import autotune

captured = {launch.fn for launch in report.capture_launches()}
launchers = {name: autotune.launcher(name) for name in autotune.LAUNCHERS}
listed = {name: target.fn if name in autotune.TUNERS else target for name, target in launchers.items()}
print(json.dumps({"missed": sorted(name for name, fn in listed.items() if fn not in captured),
                  "kernels": sorted(fn.__name__ for fn in captured)}))
"""


def test_the_capture_reaches_every_listed_launcher(tmp_path):
    """The report captures launches through kernels.autotune.LAUNCHERS (the launch code on meta tensors, no
    compiling): every listed launcher is reached, and a kernel outside the list would be launched for real
    on meta tensors and fail."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", CAPTURE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["missed"] == []
    assert len(result["kernels"]) == 8


def test_an_out_that_cannot_be_written_is_refused_before_compiling(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "run", lambda *args, **kwargs: pytest.fail("compiled before checking --out"))
    assert report.main(["--ci", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a directory; give the report's file, e.g. --out {tmp_path / 'kernel_compile.json'}" \
        in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert report.main(["--out", str(blocker / "sub" / "kernel_compile.json")]) == 2
    assert f"{blocker} is not a directory" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


def test_refuses_to_run_in_interpreter_mode(tmp_path):
    proc = _run(tmp_path, "--ci", "--out", str(tmp_path / "x.json"), env_extra={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 2 and "unset TRITON_INTERPRET" in proc.stderr
