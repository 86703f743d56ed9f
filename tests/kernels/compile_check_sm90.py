"""Compile the GPU path of every kernel for an H100 (sm_90) without a GPU: Triton lowers to PTX and
runs its bundled ptxas, so type errors, tl.dot shape limits and bad constexpr combinations that the
CPU interpreter never sees fail here. Run by test_gpu_compile.py in a fresh process (the test
session imports the kernels in interpreter mode). Prints one line per kernel variant."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels.mpc_loss as mpc  # noqa: E402
import kernels.rope as rope  # noqa: E402
import kernels.rotary_attention as attention  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_variant(kernel, pointer_types: dict[str, str], float_args: tuple[str, ...], config: triton.Config,
                    constexprs: dict) -> None:
    constexprs = {**constexprs, **config.kwargs}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        else:
            signature[name] = "fp32" if name in float_args else "i32"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=TARGET,
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    assert "cubin" in compiled.asm, f"{kernel.__name__}: no cubin"
    print(f"ok {kernel.__name__} {sorted(constexprs.items())} warps={config.num_warps} "
          f"stages={config.num_stages} shared={compiled.metadata.shared}", flush=True)


def main() -> int:
    rope_config = rope._rotary_kernel_tuned.configs[0]
    for dtype in ("bf16", "fp32"):
        compile_variant(rope._rotary_kernel, {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "cos_ptr": "*fp32",
                                              "sin_ptr": "*fp32"}, (), rope_config,
                        dict(INTERLEAVED=dtype == "bf16", CONJUGATE=dtype == "fp32", BLOCK_H=16, BLOCK_HALF=32))

    variants = [  # dtype, head_dim, mask, interleaved, precision, dropout (fp16 and head_dim 128 compile alike)
        ("bf16", 64, True, True, "tf32", False),
        ("fp32", 32, True, False, "ieee", False),
        ("bf16", 64, True, True, "tf32", True),
    ]
    small = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)
    for dtype, head_dim, has_mask, interleaved, precision, dropout in variants:
        pointers = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "do_ptr", "dq_ptr",
                                                    "dk_ptr", "dv_ptr")}
        pointers.update(cos_ptr="*fp32", sin_ptr="*fp32", mask_ptr="*i32", lse_ptr="*fp32", delta_ptr="*fp32",
                        seed_ptr="*i64")
        meta = dict(HAS_MASK=has_mask, INTERLEAVED=interleaved, DOT_PRECISION=precision, UPCAST_DOT=False,
                    DROPOUT=dropout, BLOCK_HALF=max(16, head_dim // 2), BLOCK_D=head_dim)
        config = attention._attn_fwd_tuned.configs[0] if dtype != "fp32" else small
        dropout_args = ("dropout_p", "dropout_scale")
        compile_variant(attention._attn_fwd_kernel, pointers, ("qk_scale",) + dropout_args, config, meta)
        for kernel in (attention._attn_bwd_dkdv_kernel, attention._attn_bwd_dq_kernel):
            compile_variant(kernel, pointers, ("qk_scale", "sm_scale") + dropout_args, config, meta)
    compile_variant(attention._keep_mask_kernel, {"seed_ptr": "*i64", "out_ptr": "*i8"}, ("dropout_p",),
                    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1), {})

    pointers = {"z_ptr": "*fp32", "lse_ptr": "*fp32", "grad_lse_ptr": "*fp32", "grad_z_ptr": "*fp32"}
    compile_variant(mpc._mpc_lse_fwd_kernel, pointers, ("logit_scale",), mpc._mpc_lse_fwd_tuned.configs[0],
                    dict(DOT_PRECISION="tf32"))
    compile_variant(mpc._mpc_lse_bwd_kernel, pointers, ("logit_scale", "inv_temperature"),
                    mpc._mpc_lse_bwd_tuned.configs[0], dict(DOT_PRECISION="tf32"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
