"""Compile what the GPU will run, without a GPU: every kernel x autotune config x variant, for sm_90.

Each variant's launch is captured from the kernels' own launch code (``kernels.*``: the autograd
Functions and launchers run on meta tensors, and every launcher of ``kernels.autotune.LAUNCHERS`` is
stood in for by a recorder), so the arguments, constexprs and launch-time specialisation (divisibility
by 16, ``== 1`` integers as constants) are those of a real launch. Then Triton compiles each (variant,
config) for sm_90 and its bundled ``ptxas -v`` is read.

``kernel_compile.json`` is a list of rows: ``kernel``, ``variant``, ``config``, ``status`` (``ok``,
``out_of_resources`` or ``error: ...``), ``shared_bytes``, ``registers``, ``spill_bytes`` (spill stores +
loads), ``tensor_core`` (``wgmma``, ``mma_sync`` or ``none``), and ``pruned`` (the autotuner's prune drops
this config for this variant: it never runs), ``cvt_rna`` (the PTX rounds fp32 to TF32 to nearest).

Exit status 1 when a config the autotuner can pick (not pruned) fails with anything but out-of-resources,
or does not fit the shared memory (the prune must drop those); 0 otherwise.

Variants: attention (forward, dK/dV, dQ, delta): bf16/fp16 x head_dim 32/64/128 x interleaved/halves x
mask on/off x dropout on/off; fp32 attention on a GPU goes to PyTorch's SDPA (kernels.dispatch; the kernel
refuses it). RoPE:
each layout x dtype, forward and backward (conjugate). MPC: D = 768 and 1024, forward and backward.
``--ci``: every config of the model's variants (bf16, head_dim 64, mask, interleaved, dropout on and
off), the MPC at D = 768, and one config of every other variant.

Usage: ``af-kernel-compile-report [--ci] [--out kernel_compile.json] [--jobs N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SM = 90
# Model shapes: attention [batch 32, seq 752, heads 12, head_dim 64]; MPC N = 4096 rows.
BATCH, SEQ, HEADS = 32, 752, 12
MPC_ROWS = 4096
MODEL_ATTENTION = {"dtype": "bf16", "head_dim": 64, "interleaved": True, "mask": True}


@dataclass
class Launch:
    """One captured launch: the kernel, its tuner (None for a fixed-config kernel) and the arguments."""

    kernel_name: str
    variant: str
    fn: object  # the JITFunction
    tuner: object | None
    args: tuple
    kwargs: dict
    configs: list = field(default_factory=list)
    model: bool = False  # one of the model's own variants (CI compiles every config)


class _Recorder:
    """Stands in for an autotuner or a JIT kernel: ``obj[grid](*args, **kwargs)`` records the call."""

    def __init__(self, name: str, target, sink: list):
        self.name, self.target, self.sink = name, target, sink

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.sink.append((self.name, self.target, args, kwargs))
        return record


def _dtype_name(dtype) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


@contextlib.contextmanager
def _recording(sink: list):
    """Stand a recorder in for every launcher of ``kernels.autotune.LAUNCHERS``, so that the kernels' launch
    code, run on meta tensors (compiled kernels: their GPU branch), records its launches instead of starting
    them."""
    import importlib

    from kernels.autotune import LAUNCHERS, launcher

    saved = [(importlib.import_module(module), attribute, launcher(name))
             for name, (module, attribute) in LAUNCHERS.items()]
    try:
        for (module, attribute, target), name in zip(saved, LAUNCHERS):
            setattr(module, attribute, _Recorder(name, target, sink))
        yield
    finally:
        for module, attribute, target in saved:
            setattr(module, attribute, target)


def _attention_variants() -> Iterator[dict]:
    for dtype in ("bf16", "fp16"):
        for head_dim in (32, 64, 128):
            for interleaved in (True, False):
                for mask in (True, False):
                    for dropout in (True, False):
                        yield {"dtype": dtype, "head_dim": head_dim, "interleaved": interleaved, "mask": mask,
                               "dropout": dropout}


def _capture_attention(variant: dict) -> list:
    import torch

    import kernels.rotary_attention as attention
    from kernels import reference

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[variant["dtype"]]
    shape = (BATCH, SEQ, HEADS, variant["head_dim"])
    # q, k, v as the model makes them: views of [batch, seq, hidden] linear outputs.
    q, k, v = (torch.empty(shape, dtype=dtype, device="meta", requires_grad=True) for _ in range(3))
    cos, sin = reference.rotary_tables(SEQ, variant["head_dim"], device="meta")
    mask = torch.empty((BATCH, SEQ), dtype=torch.int32, device="meta") if variant["mask"] else None
    sink: list = []
    with _recording(sink):
        out = attention._RotaryAttention.apply(q, k, v, cos, sin, mask, variant["interleaved"],
                                               variant["head_dim"] ** -0.5, 0.1 if variant["dropout"] else 0.0)
        out.backward(torch.empty_like(out))
    return sink


def _capture_rope(variant: dict) -> list:
    import torch

    import kernels.rope as rope
    from kernels import reference

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[variant["dtype"]]
    x = torch.empty((BATCH, SEQ, HEADS, 64), dtype=dtype, device="meta")
    cos, sin = reference.rotary_tables(SEQ, 64, device="meta")
    sink: list = []
    with _recording(sink):
        rope._launch(x, torch.empty_like(x), cos, sin, variant["interleaved"], variant["conjugate"])
    return sink


def _capture_mpc(variant: dict) -> list:
    import torch

    import kernels.mpc_loss as mpc

    z = torch.empty((MPC_ROWS, variant["dim"]), dtype=torch.float32, device="meta")
    sink: list = []
    with _recording(sink):
        lse = mpc._lse_forward(z, 0.05)
        mpc._lse_backward(z, lse, torch.empty_like(lse), 0.05)
    return sink


def _capture_keep_mask() -> list:
    import torch

    import kernels.rotary_attention as attention

    seed = torch.empty(1, dtype=torch.int64, device="meta")
    out = torch.empty((2, HEADS, SEQ, SEQ), dtype=torch.int8, device="meta")
    sink: list = []
    with _recording(sink):
        attention._launch_keep_mask(seed, out, 0.1)
    return sink


def _variant_name(variant: dict) -> str:
    parts = []
    for key, value in variant.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'on' if value else 'off'}")
        else:
            parts.append(f"{key}={value}")
    return ",".join(parts)


def capture_launches() -> list[Launch]:
    """Every launch the kernels make for every variant, with the configs each can take."""
    launches: list[Launch] = []

    def add(sink, variant: dict, model: bool) -> None:
        for _name, target, args, kwargs in sink:
            tuner = target if hasattr(target, "configs") else None
            fn = tuner.fn if tuner is not None else target
            launches.append(Launch(kernel_name=fn.__name__, variant=_variant_name(variant), fn=fn, tuner=tuner,
                                   args=args, kwargs=kwargs, model=model))

    for variant in _attention_variants():
        model = all(variant[key] == value for key, value in MODEL_ATTENTION.items())
        add(_capture_attention(variant), variant, model)
    for dtype in ("bf16", "fp16", "fp32"):
        for interleaved in (True, False):
            for conjugate in (False, True):
                variant = {"dtype": dtype, "interleaved": interleaved, "conjugate": conjugate}
                add(_capture_rope(variant), variant, False)
    for dim in (768, 1024):
        add(_capture_mpc({"dim": dim}), {"dim": dim}, dim == 768)
    add(_capture_keep_mask(), {"dropout": True}, False)
    unique: dict[str, Launch] = {}
    for launch in launches:
        launch.configs = _configs_of(launch)
        # Variants that compile to the same kernels and prune alike (the delta kernel ignores mask,
        # layout and dropout) are compiled once, under the first variant's name.
        key = _compile_key(launch) + repr([pruned for _, pruned in launch.configs])
        first = unique.setdefault(key, launch)
        first.model = first.model or launch.model
    return list(unique.values())


def _compile_key(launch: Launch) -> str:
    """What decides the compiled code apart from the config: the kernel, the argument types and
    specialisation, and the constexprs passed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(launch.fn.signature, launch.fn.params,
                                            make_backend(GPUTarget("cuda", SM, 32)))
    kwargs = dict(launch.kwargs)
    if launch.tuner is not None:
        kwargs.update({k: v for k, v in launch.tuner.configs[0].all_kwargs().items() if v is not None})
    _, specialization, options = binder(*launch.args, **kwargs)
    return repr((launch.fn.__name__, specialization, sorted(options.items())))


def _configs_of(launch: Launch) -> list[tuple[object, bool]]:
    """(config, pruned) pairs: every config of the tuner, marked when its prune drops it for these args;
    a fixed-config launch has one pseudo-config (its own keyword arguments)."""
    import triton

    if launch.tuner is None:
        return [(None, False)]
    tuner = launch.tuner
    tuner.nargs = dict(zip(tuner.arg_names, launch.args))
    try:
        kept = tuner.prune_configs(dict(launch.kwargs))
    finally:
        tuner.nargs = None
    kept_ids = {id(config) for config in kept}
    assert all(isinstance(config, triton.Config) for config in tuner.configs)
    return [(config, id(config) not in kept_ids) for config in tuner.configs]


def _config_label(config, kwargs: dict) -> str:
    if config is None:
        blocks = {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}
        return ",".join(f"{k}={v}" for k, v in blocks.items()) + f",warps={kwargs.get('num_warps', 4)}"
    blocks = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks},warps={config.num_warps},stages={config.num_stages}"


_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _tensor_core(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma_sync"
    return "none"


def compile_one(launch: Launch, config, pruned: bool) -> dict:
    """Compile one (launch, config) for sm_90 and read ptxas -v."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.errors import OutOfResources
    from triton.runtime.jit import create_function_from_signature

    from kernels.autotune import SHARED_MEMORY_SM90

    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.all_kwargs())
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    row = {"kernel": launch.kernel_name, "variant": launch.variant, "config": _config_label(config, kwargs),
           "status": "ok", "shared_bytes": None, "registers": None, "spill_bytes": None, "tensor_core": None,
           "pruned": pruned, "cvt_rna": None}
    target = GPUTarget("cuda", SM, 32)
    backend = make_backend(target)
    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    log = io.StringIO()
    try:
        bound_args, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
        source = ASTSource(fn, signature, constexprs, attrs)
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True  # a cache hit would have no ptxas log
            compiled = triton.compile(source, target=target, options=options.__dict__)
    except OutOfResources:
        row["status"] = "out_of_resources"
        return row
    except Exception as error:  # noqa: BLE001 - every failure becomes a row
        message = str(error).strip().splitlines()
        row["status"] = f"error: {type(error).__name__}: {message[0] if message else ''}"[:300]
        return row
    ptxas = log.getvalue()
    ptx = compiled.asm.get("ptx", "")
    registers = _PTXAS_USAGE.search(ptxas)
    spills = _SPILL.findall(ptxas)
    row["shared_bytes"] = int(compiled.metadata.shared)
    row["registers"] = int(registers.group(1)) if registers else None
    row["spill_bytes"] = sum(int(a) + int(b) for a, b in spills) if spills else None
    row["tensor_core"] = _tensor_core(ptx)
    row["cvt_rna"] = "cvt.rna.tf32.f32" in ptx
    if row["shared_bytes"] > SHARED_MEMORY_SM90:
        row["status"] = "out_of_resources"  # a launch would raise OutOfResources (shared memory)
    return row


def select(launches: list[Launch], ci: bool) -> list[tuple[Launch, object, bool]]:
    """The (launch, config, pruned) work list: everything, or the CI subset."""
    work = []
    for launch in launches:
        configs = launch.configs
        if ci and not launch.model:
            unpruned = [pair for pair in configs if not pair[1]]
            configs = unpruned[:1] or configs[:1]
        work += [(launch, config, pruned) for config, pruned in configs]
    return work


_WORK: list = []  # filled before the worker processes fork (they inherit it)


def _compile_index(index: int) -> dict:
    return compile_one(*_WORK[index])


def run(ci: bool, jobs: int, progress: bool = True) -> list[dict]:
    launches = capture_launches()
    work = select(launches, ci)
    _WORK[:] = work
    rows: list[dict] = []
    start = time.time()
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for i, row in enumerate(pool.imap(_compile_index, range(len(work)))):
                rows.append(row)
                if progress and (i + 1) % 25 == 0:
                    print(f"  {i + 1}/{len(work)} compiled ({time.time() - start:.0f} s)", file=sys.stderr)
    else:
        for i in range(len(work)):
            rows.append(_compile_index(i))
            if progress and (i + 1) % 25 == 0:
                print(f"  {i + 1}/{len(work)} compiled ({time.time() - start:.0f} s)", file=sys.stderr)
    return rows


def failures(rows: list[dict]) -> list[dict]:
    """Rows that make the report fail: a config the tuner can pick that errors, or does not fit."""
    return [row for row in rows if not row["pruned"] and row["status"] != "ok"]


def summary(rows: list[dict]) -> dict:
    """Counts for the closing note, and the best zero-spill wgmma config per kernel at the model's shapes."""
    compiled = [row for row in rows if row["status"] == "ok"]
    summary_ = {
        "rows": len(rows),
        "compiled": len(compiled),
        "spilling": sum(1 for row in compiled if row["spill_bytes"]),
        "out_of_resources": sum(1 for row in rows if row["status"] == "out_of_resources"),
        "errors": sum(1 for row in rows if row["status"].startswith("error")),
        "pruned": sum(1 for row in rows if row["pruned"]),
        "failures": len(failures(rows)),
        "model_zero_spill": {},
    }
    model = _variant_name({**MODEL_ATTENTION, "mask": True})
    for row in compiled:
        is_model = row["variant"].startswith(model) or row["variant"] == "dim=768"
        if not is_model:
            continue
        key = f"{row['kernel']}[{row['variant']}]"
        entry = summary_["model_zero_spill"].setdefault(key, [])
        if not row["spill_bytes"] and row["tensor_core"] in ("wgmma", "none") and not row["pruned"]:
            entry.append(row["config"])
    return summary_


def out_problem(out: Path) -> str | None:
    """Why the report could not be written to ``out``, or None: checked before the long compile."""
    if out.is_dir():
        return f"--out {out} is a directory; give the report's file, e.g. --out {out / 'kernel_compile.json'}"
    existing = next(folder for folder in (out.parent, *out.parent.parents) if folder.exists())
    if not existing.is_dir():
        return f"--out {out}: {existing} is not a directory"
    if not os.access(out if out.exists() else existing, os.W_OK):
        return f"--out {out}: not writable here ({out if out.exists() else existing})"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ci", action="store_true",
                        help="every config of the model's variants, one config of every other variant")
    parser.add_argument("--out", type=Path, default=Path("kernel_compile.json"), help="the JSON report")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    problem = out_problem(args.out)
    if problem:
        print(f"kernel_compile_report: {problem}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("kernel_compile_report: unset TRITON_INTERPRET (it compiles for the GPU, not the interpreter)",
              file=sys.stderr)
        return 2
    from kernels.utils import kernels_interpreted

    if kernels_interpreted():
        print("kernel_compile_report: the kernels were imported in interpreter mode; run in a fresh process "
              "without TRITON_INTERPRET", file=sys.stderr)
        return 2
    rows = run(args.ci, max(1, args.jobs), progress=not args.quiet)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    report = summary(rows)
    print(json.dumps(report, indent=1))
    bad = failures(rows)
    for row in bad:
        print(f"FAIL {row['kernel']} [{row['variant']}] {row['config']}: {row['status']}", file=sys.stderr)
    return 1 if bad else 0


def console_main(argv: list[str] | None = None) -> int:
    """Entry point: compile into a fresh Triton cache (a cached kernel has no ptxas log)."""
    with tempfile.TemporaryDirectory(prefix="af-kernel-compile-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        return main(argv)


if __name__ == "__main__":
    sys.exit(console_main())
