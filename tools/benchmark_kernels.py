"""Benchmark af_train's Triton kernels against their PyTorch baselines.

For each kernel (RoPE, rotary flash attention, MPC loss) and shape, times forward / backward / full
(forward + backward) with ``triton.testing.do_bench`` (median ms; ``--cuda-graph`` uses the
CUDA-graph variant for microsecond kernels), reports achieved GB/s (RoPE) or TFLOP/s (attention,
MPC) against the peaks measured on this GPU (a device-to-device copy and a bf16 matmul), peak
memory, and the correctness of the Triton output against the reference. Baselines: the PyTorch
eager reference, ``torch.compile`` of it, and for attention ``apply_rotary`` + SDPA with the flash
backend. A baseline that runs out of memory is recorded as ``oom``, never a crash.

Writes ``kernels.csv``, ``kernels.json`` (rows + device name, torch/triton versions, git commit,
date, measured peaks, and the issue's targets checked) and ``kernels.png`` into ``--out``
(default ``benchmarks/results/<gpu>/``).

``--device cpu`` runs a tiny smoke configuration with the kernels in Triton's CPU interpreter
(TRITON_INTERPRET=1) and wall-clock timing, so CI exercises the whole script; its numbers say
nothing about GPU speed.

    python tools/benchmark_kernels.py                      # full GPU run
    python tools/benchmark_kernels.py --kernels mpc --mpc-sizes 1024,8192,65536
    python tools/benchmark_kernels.py --device cpu --out /tmp/bench
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import functools
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Installed (not from a checkout): results go under the working directory instead.
RESULTS_ROOT = REPO_ROOT if (REPO_ROOT / "kernels").is_dir() else Path.cwd()
KERNELS = ("rope", "attention", "mpc")
MODEL_SHAPE = (32, 751, 12, 64)  # [batch, seq, heads, head_dim] of the base model on 10 s clips
MPC_DIM = 768
DROPOUT_P = 0.1  # the model's attention_probs_dropout_prob
MPC_VIEWS = 4  # views per clip (code rows) in FT2
CSV_FIELDS = (
    "kernel", "shape", "size", "impl", "mode", "status", "ms", "ms_p20", "ms_p80", "metric", "value",
    "pct_of_peak", "peak_mem_mb", "triton_speedup", "max_abs_err",
)


@dataclasses.dataclass
class Impl:
    """One implementation of one case: ``forward()`` runs it on inputs built once."""

    name: str
    forward: Callable[[], object]
    leaves: list  # tensors that receive gradients


@dataclasses.dataclass
class Case:
    kernel: str
    shape: str
    size: int  # x-axis of the plot: sequence length or N
    impls: list[Impl]
    work: dict[str, float]  # mode -> bytes (rope) or flops (attention, mpc)
    reference_output: Callable[[], object] | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmark_kernels",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Outputs: kernels.csv, kernels.json, kernels.png in --out.",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="cuda (default when a GPU is visible) or cpu: tiny smoke run in the Triton interpreter")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default benchmarks/results/<device name>)")
    parser.add_argument("--kernels", default=",".join(KERNELS),
                        help=f"comma-separated subset of {','.join(KERNELS)} (default all)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="input dtype on GPU (default bfloat16; the CPU smoke run uses float32)")
    parser.add_argument("--seq-lens", default="128,256,512,751,1024,2048",
                        help="sequence-length sweep for RoPE and attention at batch 32, 12 heads, head_dim 64")
    parser.add_argument("--mpc-sizes", default="1024,2048,4096,8192,16384,32768,65536,131072",
                        help=f"MPC N sweep at D={MPC_DIM}, {MPC_VIEWS} views per clip")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time with triton.testing.do_bench_cudagraph (less launch overhead)")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warmup time (ms)")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench measurement time (ms)")
    parser.add_argument("--cpu-repeats", type=int, default=2, help="timed repeats per measurement on cpu")
    args = parser.parse_args(argv)
    chosen = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = sorted(set(chosen) - set(KERNELS))
    if unknown or not chosen:
        parser.error(f"--kernels: unknown {unknown or 'empty list'}; choose from {','.join(KERNELS)}")
    args.kernels = chosen
    try:
        args.seq_lens = [int(s) for s in args.seq_lens.split(",") if s.strip()]
        args.mpc_sizes = [int(s) for s in args.mpc_sizes.split(",") if s.strip()]
    except ValueError as err:
        parser.error(f"--seq-lens/--mpc-sizes take comma-separated integers: {err}")
    return args


# --------------------------------------------------------------------------------------------- env


def _git_commit() -> dict[str, object]:
    from af_train.files import git_commit

    found = git_commit(REPO_ROOT)
    return {**found, "commit": found["commit"] or "unknown"}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, args: argparse.Namespace,
            grad_to_none: list | None = None) -> tuple[float, float | None, float | None]:
    """Median (p20, p80) milliseconds of ``fn``."""
    import triton.testing

    if device == "cuda":
        if args.cuda_graph:
            ms = triton.testing.do_bench_cudagraph(fn, rep=args.rep_ms, grad_to_none=grad_to_none,
                                                   return_mode="median")
            return float(ms), None, None
        med, p20, p80 = triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms,
                                                grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    fn()  # warm-up
    samples = []
    for _ in range(max(1, args.cpu_repeats)):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), min(samples), max(samples)


def measure_peaks(device: str, args: argparse.Namespace) -> dict[str, float]:
    """Memory bandwidth (device-to-device copy) and bf16 matmul throughput measured here."""
    import torch

    if device == "cuda":
        nbytes, n = 1 << 30, 8192
        dtype = torch.bfloat16
    else:
        nbytes, n = 1 << 24, 256
        dtype = torch.float32

    def copy_probe() -> float:
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        return time_ms(lambda: dst.copy_(src), device, args)[0]

    def matmul_probe() -> float:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        return time_ms(lambda: a @ b, device, args)[0]

    copy_ms = copy_probe()
    mm_ms = matmul_probe()
    _free(device)
    return {
        "bandwidth_gbps": 2 * nbytes / copy_ms / 1e6,
        "matmul_tflops": 2 * n**3 / mm_ms / 1e9,
        "bandwidth_probe": f"copy of {nbytes >> 20} MiB",
        "matmul_probe": f"{str(dtype).replace('torch.', '')} matmul {n}^3",
    }


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ------------------------------------------------------------------------------------------- cases


def _compiled(fn: Callable, args: argparse.Namespace, device: str) -> Callable | None:
    import torch

    if args.no_compile or device != "cuda":
        return None
    return torch.compile(fn, dynamic=False)


def rope_cases(shapes: list[tuple[int, int, int, int]], dtype, device: str, args) -> list[Case]:
    import torch

    from kernels import reference
    from kernels.rope import apply_rotary

    cases = []
    compiled = _compiled(reference.apply_rotary, args, device)
    for batch, seq, heads, dim in shapes:
        x = torch.randn(batch, seq, heads, dim, dtype=dtype, device=device, requires_grad=True)
        cos, sin = reference.rotary_tables(seq, dim, device=device)
        impls = [
            Impl("triton", lambda x=x, c=cos, s=sin: apply_rotary(x, c, s), [x]),
            Impl("eager", lambda x=x, c=cos, s=sin: reference.apply_rotary(x, c, s), [x]),
        ]
        if compiled is not None:
            impls.append(Impl("compile", lambda x=x, c=cos, s=sin: compiled(x, c, s), [x]))
        moved = 2 * x.numel() * x.element_size() + 2 * cos.numel() * cos.element_size()
        cases.append(Case("rope", f"{batch}x{seq}x{heads}x{dim}", seq, impls,
                          {"fwd": moved, "bwd": moved, "full": 2 * moved},
                          reference_output=lambda x=x, c=cos, s=sin: reference.apply_rotary(x, c, s)))
    return cases


def attention_cases(shapes: list[tuple[int, int, int, int]], dtype, device: str, args) -> list[Case]:
    import torch
    import torch.nn.functional as F

    from kernels import dispatch, reference
    from kernels.rope import apply_rotary

    # "triton": what model.kernels=triton runs (fp32 on a GPU: PyTorch's SDPA; kernels.dispatch decides)
    rotary_attention = functools.partial(dispatch.rotary_attention, backend="triton")
    compiled = _compiled(reference.rotary_attention, args, device)

    def rope_then_sdpa(q, k, v, cos, sin):
        qr = apply_rotary(q, cos, sin).transpose(1, 2)
        kr = apply_rotary(k, cos, sin).transpose(1, 2)
        if device == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(qr, kr, v.transpose(1, 2))
        else:
            out = F.scaled_dot_product_attention(qr, kr, v.transpose(1, 2))
        return out.transpose(1, 2)

    cases = []
    for batch, seq, heads, dim in shapes:
        q, k, v = (torch.randn(batch, seq, heads, dim, dtype=dtype, device=device, requires_grad=True)
                   for _ in range(3))
        cos, sin = reference.rotary_tables(seq, dim, device=device)
        lengths = torch.randint(seq // 2, seq + 1, (batch,), device=device)
        mask = (torch.arange(seq, device=device)[None, :] < lengths[:, None]).long()
        leaves = [q, k, v]
        impls = [
            Impl("triton", lambda q=q, k=k, v=v, c=cos, s=sin: rotary_attention(q, k, v, c, s), leaves),
            Impl("triton+padding_mask",
                 lambda q=q, k=k, v=v, c=cos, s=sin, m=mask: rotary_attention(q, k, v, c, s, m), leaves),
            # the model's attention dropout: its cost against the same call with p = 0 (row above)
            Impl(f"triton+padding_mask+dropout{DROPOUT_P}",
                 lambda q=q, k=k, v=v, c=cos, s=sin, m=mask: rotary_attention(q, k, v, c, s, m, dropout_p=DROPOUT_P),
                 leaves),
            Impl("eager", lambda q=q, k=k, v=v, c=cos, s=sin: reference.rotary_attention(q, k, v, c, s), leaves),
            Impl("rope+sdpa_flash" if device == "cuda" else "rope+sdpa",
                 lambda q=q, k=k, v=v, c=cos, s=sin: rope_then_sdpa(q, k, v, c, s), leaves),
        ]
        if compiled is not None:
            impls.append(Impl("compile", lambda q=q, k=k, v=v, c=cos, s=sin: compiled(q, k, v, c, s), leaves))
        fwd = 4.0 * batch * heads * seq * seq * dim
        cases.append(Case("attention", f"{batch}x{seq}x{heads}x{dim}", seq, impls,
                          {"fwd": fwd, "bwd": 2.5 * fwd, "full": 3.5 * fwd},
                          reference_output=lambda q=q, k=k, v=v, c=cos, s=sin:
                          reference.rotary_attention(q, k, v, c, s)))
    return cases


def mpc_cases(sizes: list[int], dim: int, dtype, device: str, args) -> list[Case]:
    import torch

    from kernels import reference
    from kernels.mpc_loss import mpc_loss

    compiled = _compiled(reference.mpc_loss, args, device)
    cases = []
    for n in sizes:
        embeddings = torch.randn(n, dim, dtype=dtype, device=device, requires_grad=True)
        groups = torch.arange(math.ceil(n / MPC_VIEWS), device=device).repeat_interleave(MPC_VIEWS)[:n]
        impls = [
            Impl("triton", lambda e=embeddings, g=groups: mpc_loss(e, g, 0.05), [embeddings]),
            Impl("eager", lambda e=embeddings, g=groups: reference.mpc_loss(e, g, 0.05), [embeddings]),
        ]
        if compiled is not None:
            impls.append(Impl("compile", lambda e=embeddings, g=groups: compiled(e, g, 0.05), [embeddings]))
        fwd = 2.0 * n * n * dim  # the similarity matmul; backward needs two more of that size
        cases.append(Case("mpc", f"N={n},D={dim}", n, impls, {"fwd": fwd, "bwd": 2 * fwd, "full": 3 * fwd},
                          reference_output=lambda e=embeddings, g=groups: reference.mpc_loss(e, g, 0.05)))
    return cases


# ------------------------------------------------------------------------------------------- measure


def measure(case: Case, impl: Impl, mode: str, device: str, args, peaks: dict[str, float]) -> dict:
    import torch

    row = {"kernel": case.kernel, "shape": case.shape, "size": case.size, "impl": impl.name, "mode": mode,
           "status": "ok"}
    try:
        if mode == "fwd":
            fn = impl.forward
        else:
            probe = impl.forward()
            grad = torch.randn_like(probe) if probe.dim() else torch.ones_like(probe)
            del probe
            if mode == "bwd":
                out = impl.forward()
                fn = lambda: out.backward(grad, retain_graph=True)
            else:
                fn = lambda: impl.forward().backward(grad)
        median, p20, p80 = time_ms(fn, device, args, grad_to_none=impl.leaves)
        row.update(ms=median, ms_p20=p20, ms_p80=p80)
        if device == "cuda" and mode == "full":
            _sync(device)
            for t in impl.leaves:
                t.grad = None
            _free(device)
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            _sync(device)
            row["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        work = case.work[mode]
        if case.kernel == "rope":
            value = work / median / 1e6
            row.update(metric="GB/s", value=value, pct_of_peak=100 * value / peaks["bandwidth_gbps"])
        else:
            value = work / median / 1e9
            row.update(metric="TFLOP/s", value=value, pct_of_peak=100 * value / peaks["matmul_tflops"])
    except Exception as err:  # noqa: BLE001 - every failure is recorded in the row, then we go on
        row["status"] = "oom" if _is_oom(err) else f"error: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    finally:
        fn = out = grad = None  # noqa: F841 - drop graphs before freeing
        for t in impl.leaves:
            t.grad = None
        _free(device)
    return row


def check_correctness(case: Case, device: str) -> float | None:
    """Max |triton - reference| of the forward output (None if the reference cannot run)."""
    import torch

    triton_impl = case.impls[0]
    try:
        with torch.no_grad():
            got = triton_impl.forward()
            want = case.reference_output()
            return float((got.float() - want.float()).abs().max())
    except Exception as err:  # noqa: BLE001
        if _is_oom(err):
            return None
        raise
    finally:
        _free(device)


def add_speedups(rows: list[dict]) -> None:
    triton_ms = {(r["kernel"], r["shape"], r["mode"]): r["ms"] for r in rows
                 if r["impl"] == "triton" and r["status"] == "ok"}
    for r in rows:
        base = triton_ms.get((r["kernel"], r["shape"], r["mode"]))
        if base and r["status"] == "ok":
            r["triton_speedup"] = r["ms"] / base  # > 1: Triton is that many times faster


def check_targets(rows: list[dict], peaks: dict[str, float]) -> dict[str, dict]:
    """The issue's targets, evaluated where the needed rows exist (GPU runs)."""
    def find(kernel, shape, impl, mode="full"):
        for r in rows:
            if (r["kernel"], r["shape"], r["impl"], r["mode"]) == (kernel, shape, impl, mode):
                return r
        return None

    model = "x".join(map(str, MODEL_SHAPE))
    targets: dict[str, dict] = {}
    rope = find("rope", model, "triton")
    if rope and rope["status"] == "ok":
        targets["rope_full_pct_of_bandwidth>=85"] = {"value": rope["pct_of_peak"], "met": rope["pct_of_peak"] >= 85}
        comp = find("rope", model, "compile")
        if comp and comp["status"] == "ok":
            targets["rope_full_vs_compile>=1.2x"] = {"value": comp["triton_speedup"],
                                                      "met": comp["triton_speedup"] >= 1.2}
    attn = find("attention", model, "rope+sdpa_flash")
    if attn and attn["status"] == "ok" and attn.get("triton_speedup"):
        targets["attention_full_vs_rope+sdpa_flash>=1.15x"] = {"value": attn["triton_speedup"],
                                                                "met": attn["triton_speedup"] >= 1.15}
    plain = find("attention", model, "triton+padding_mask")
    dropped = find("attention", model, f"triton+padding_mask+dropout{DROPOUT_P}")
    if plain and dropped and plain["status"] == "ok" and dropped["status"] == "ok":
        ratio = dropped["ms"] / plain["ms"]
        targets[f"attention_dropout{DROPOUT_P}_full_vs_p0<=1.3x"] = {"value": ratio, "met": ratio <= 1.3}
    big = find("mpc", f"N=65536,D={MPC_DIM}", "triton")
    if big and big["status"] == "ok" and big.get("peak_mem_mb") is not None:
        targets["mpc_N65536_peak_mem<1GB"] = {"value_mb": big["peak_mem_mb"], "met": big["peak_mem_mb"] < 1024}
    naive = find("mpc", f"N=8192,D={MPC_DIM}", "eager")
    if naive and naive["status"] == "ok" and naive.get("triton_speedup"):
        ratio = 1 / naive["triton_speedup"]
        targets["mpc_N8192_time<=1.3x_naive"] = {"value": ratio, "met": ratio <= 1.3}
    return targets


# ---------------------------------------------------------------------------------------------- out


def write_outputs(out_dir: Path, rows: list[dict], meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "kernels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    with open(out_dir / "kernels.json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    plot(out_dir / "kernels.png", rows, meta)


def plot(path: Path, rows: list[dict], meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = [k for k in KERNELS if any(r["kernel"] == k for r in rows)]
    fig, axes = plt.subplots(1, len(kernels), figsize=(5.5 * len(kernels), 4.2), squeeze=False)
    for ax, kernel in zip(axes[0], kernels):
        impls = list(dict.fromkeys(r["impl"] for r in rows if r["kernel"] == kernel))
        for impl in impls:
            pts = sorted((r["size"], r["ms"]) for r in rows
                         if r["kernel"] == kernel and r["impl"] == impl and r["mode"] == "full" and r["status"] == "ok")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
            ooms = [r["size"] for r in rows if r["kernel"] == kernel and r["impl"] == impl
                    and r["mode"] == "full" and r["status"] == "oom"]
            if ooms and pts:
                ax.scatter(ooms, [max(p[1] for p in pts)] * len(ooms), marker="x", color="red",
                           label=f"{impl}: out of memory")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N" if kernel == "mpc" else "sequence length")
        ax.set_ylabel("forward + backward (ms, median)")
        ax.set_title(kernel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{meta['device']} · torch {meta['torch']} · triton {meta['triton']} · {meta['git']['commit'][:10]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    header = (f"{'kernel':<10}{'shape':<22}{'impl':<22}{'mode':<6}{'ms':>10}{'value':>12} {'unit':<8}"
              f"{'%peak':>7}{'x':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['kernel']:<10}{r['shape']:<22}{r['impl']:<22}{r['mode']:<6}  {r['status']}")
            continue
        speed = f"{r['triton_speedup']:.2f}" if r.get("triton_speedup") else ""
        print(f"{r['kernel']:<10}{r['shape']:<22}{r['impl']:<22}{r['mode']:<6}{r['ms']:>10.3f}"
              f"{r['value']:>12.4g} {r['metric']:<8}{r['pct_of_peak']:>7.1f}{speed:>7}")


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("benchmark_kernels: --device cuda but no GPU is visible; use --device cpu for the smoke run",
              file=sys.stderr)
        return 2
    if device == "cpu":
        # Must precede the first import of the kernel modules: Triton fixes interpreter vs compiled
        # when a kernel is decorated.
        os.environ["TRITON_INTERPRET"] = "1"
        from kernels.utils import kernels_interpreted

        if not kernels_interpreted():
            print("benchmark_kernels: kernels were imported before TRITON_INTERPRET=1 could be set",
                  file=sys.stderr)
            return 2
    import triton
    from tqdm import tqdm

    smoke = device == "cpu"
    if smoke:
        torch.set_num_threads(1)  # steadier wall-clock numbers on a shared CI machine
    dtype = torch.float32 if smoke else getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name() if device == "cuda" else (
        f"cpu ({platform.processor() or platform.machine()}, Triton interpreter)")
    out_dir = args.out or RESULTS_ROOT / "benchmarks" / "results" / _slug(device_name if not smoke else "cpu-smoke")
    torch.manual_seed(0)

    if smoke:
        rope_shapes = [(2, 33, 2, 32)]
        attn_shapes = [(1, 33, 2, 32)]
        mpc_sizes, mpc_dim = [72], 32
    else:
        batch, _, heads, dim = MODEL_SHAPE
        seqs = sorted(set(args.seq_lens) | {MODEL_SHAPE[1]})
        rope_shapes = [(batch, s, heads, dim) for s in seqs]
        attn_shapes = rope_shapes
        mpc_sizes, mpc_dim = args.mpc_sizes, MPC_DIM

    print(f"benchmark_kernels on {device_name}: torch {torch.__version__}, triton {triton.__version__}, "
          f"dtype {str(dtype).replace('torch.', '')}")
    peaks = measure_peaks(device, args)
    print(f"measured peaks: {peaks['bandwidth_gbps']:.0f} GB/s ({peaks['bandwidth_probe']}), "
          f"{peaks['matmul_tflops']:.1f} TFLOP/s ({peaks['matmul_probe']})")

    builders = {
        "rope": lambda: rope_cases(rope_shapes, dtype, device, args),
        "attention": lambda: attention_cases(attn_shapes, dtype, device, args),
        "mpc": lambda: mpc_cases(mpc_sizes, mpc_dim, dtype, device, args),
    }
    rows: list[dict] = []
    for kernel in args.kernels:
        cases = builders[kernel]()
        total = sum(len(c.impls) for c in cases) * 3
        with tqdm(total=total, desc=kernel, unit="run", file=sys.stderr, disable=None) as bar:
            for case in cases:
                error = check_correctness(case, device)
                for impl in case.impls:
                    for mode in ("fwd", "bwd", "full"):
                        bar.set_postfix_str(f"{case.shape} {impl.name} {mode}")
                        row = measure(case, impl, mode, device, args, peaks)
                        if impl.name == "triton":
                            row["max_abs_err"] = error
                        rows.append(row)
                        bar.update()
            del cases
            _free(device)
    if not args.no_compile and smoke:
        print("note: torch.compile baselines run on GPU only (compiling on the CPU smoke run is slow)")
    add_speedups(rows)
    meta = {
        "device": device_name,
        "device_kind": device,
        "smoke_run": smoke,
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git": _git_commit(),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "peaks": peaks,
        "timing": ("wall clock, median of repeats (Triton interpreter)" if smoke else
                   ("triton.testing.do_bench_cudagraph, median" if args.cuda_graph
                    else "triton.testing.do_bench, median with p20/p80")),
        "work": {"rope": "bytes read + written", "attention": "4*B*H*S^2*D fwd, 2.5x bwd",
                 "mpc": "2*N^2*D fwd, 2x bwd"},
        "targets": check_targets(rows, peaks),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    write_outputs(out_dir, rows, meta)
    print_table(rows)
    for name, target in meta["targets"].items():
        print(f"target {name}: {'met' if target['met'] else 'NOT met'} ({target})")
    print(f"wrote {out_dir / 'kernels.csv'}, {out_dir / 'kernels.json'}, {out_dir / 'kernels.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
