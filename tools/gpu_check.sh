#!/usr/bin/env bash
# The whole GPU verification of af_train in one command, for a bare lent GPU machine (make gpu-check).
#
#   tools/gpu_check.sh [--out DIR] [--dry-run]
#
# Steps, each under its own time limit (they add up to under 9 1/4 minutes on one H100/H200) and each
# recorded even when it fails or times out; the next step always runs:
#   1. install   the wheels in .whl/ (../shared/tools/gpu-wheels.sh fills it) into /tmp/af_gpu_site
#   2. env       GPU, driver, Python and package versions
#   3. ops       DeepSpeed's FusedAdam op, JIT-compiled once here (the engine's GPU optimizer), so its
#                build time or failure shows on its own and not inside a test's or benchmark's limit
#   4. pytest    pytest -m cuda (kernels, 1-GPU ZeRO-2 training + resume, codec/tokenizers on CUDA)
#   5. kernels   a short sweep of tools/benchmark_kernels.py (seq 512/751/1024, MPC N 8192/65536)
#   6. train     af-benchmark-train, base preset, pretrain and ft1, bf16, seq 752
#   7. prepare   af-prepare throughput per GPU, EnCodec and mel-rvq (tools/benchmark_prepare.py): clips/s
#                and real-time factor after the first clip, decode/tokenize/write seconds; EnCodec's
#                official weights when torch hub's cache holds them, else the random-init codec (same
#                FLOPs), and the row says which
# Results go to --out (default benchmarks/results/<gpu name>/): gpu_check.json (commit, date, device,
# every step's status, exit code and seconds, and the prepare rows under "prepare"), gpu_check.log (all
# output), kernels.{csv,json,png}, train.{csv,json,png}. That is 8 files, what one device call brings back.
#
# --dry-run (or DRY_RUN=1) runs every step on the CPU with tiny sizes, so a typo cannot waste a GPU
# window; tests/tools/test_gpu_check.py does that in CI. GPU_CHECK_STEPS="kernels train" runs a subset.
# The commit is `git rev-parse HEAD`, or $AF_COMMIT on a copy of the tree without .git.
set -uo pipefail

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }
out=""
dry="${DRY_RUN:-0}"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ "$dry" = "0" ] || dry=1

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"

# tools/ is the package af_train_tools (setup.py maps it); make it importable without installing.
shim="$(mktemp -d /tmp/af_gpu_check_pkgs.XXXXXX)"
ln -s "$root/tools" "$shim/af_train_tools"
site=/tmp/af_gpu_site
export PYTHONPATH="$root:$shim:$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# Time limits in seconds: 520 + at most 7 x 5 s after SIGINT = 555 s, inside a 10-minute device call.
T_INSTALL=25 T_ENV=25 T_OPS=60 T_PYTEST=160 T_KERNELS=60 T_TRAIN=100 T_PREPARE=90
if [ "$dry" = 1 ]; then  # the dry run checks that every step works, not how fast: a shared CPU is slow
  T_INSTALL=600 T_ENV=600 T_OPS=600 T_PYTEST=600 T_KERNELS=600 T_TRAIN=600 T_PREPARE=600
fi

if [ -z "$out" ]; then
  if [ "$dry" = 1 ]; then
    slug=cpu-dry-run
  else
    slug="$("$python" -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))' 2>/dev/null || echo unknown-gpu)"
  fi
  out="$root/benchmarks/results/$slug"
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
logfile="$out/gpu_check.log"
: > "$logfile"
commit="${AF_COMMIT:-$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)}"
dirty="$(git -C "$root" status --porcelain 2>/dev/null | grep -q . && echo true || echo false)"
started="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
say() { echo "$*" | tee -a "$logfile"; }
say "af_train gpu_check: commit $commit (dirty: $dirty), $started, dry run: $dry, results in $out"

steps_json=""
failed=0
# run_step NAME LIMIT FUNCTION: runs one of the functions below in a child bash with a time limit
# (SIGINT first, so Python tools still write what they measured), output to the terminal and the log.
run_step() {
  local name="$1" limit="$2" function="$3"
  say ""
  say "=== step $name (limit ${limit} s): $function"
  local begin rc status
  begin=$(date +%s)
  timeout --signal=INT --kill-after=5 "$limit" bash -c "$function" 2>&1 | tee -a "$logfile"
  rc=${PIPESTATUS[0]}
  local seconds=$(( $(date +%s) - begin ))
  case "$rc" in
    0) status=ok ;;
    124|137) status="timed out after ${limit} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  [ "$rc" = 0 ] || failed=$((failed + 1))
  say "=== step $name: $status in ${seconds} s"
  steps_json="$steps_json${steps_json:+,}
    {\"step\": \"$name\", \"status\": \"$status\", \"exit_code\": $rc, \"seconds\": $seconds, \"limit_s\": $limit}"
}

install_wheels() {
  shopt -s nullglob
  local wheels=(.whl/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "no wheels in .whl/: using the packages already installed (../shared/tools/gpu-wheels.sh fills .whl/)"
    return 0
  fi
  echo "${#wheels[@]} wheels: ${wheels[*]}"
  if [ "$dry" = 1 ]; then
    echo "dry run: not installing (they are built for the GPU machine's Python)"
    return 0
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
}

print_env() {
  command -v nvidia-smi > /dev/null && nvidia-smi || echo "nvidia-smi: not found"
  "$python" - <<'EOF'
import importlib, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          "x", torch.cuda.device_count())
for name in ("triton", "deepspeed", "transformers", "streaming", "encodec", "numpy", "soundfile", "pytest"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as exc:  # every missing package is listed, not only the first
        print(name, "MISSING:", type(exc).__name__, exc)
import af_train, af_train_tools
print("af_train", af_train.__file__, "| af_train_tools", af_train_tools.__file__)
EOF
}

build_ops() {
  "$python" - <<'EOF'
import os, time
from deepspeed.ops.op_builder import FusedAdamBuilder
start = time.time()
if os.environ["dry"] == "1":
    print(f"dry run: {FusedAdamBuilder().absolute_name()} is not built on a CPU (CUDA only)")
else:
    FusedAdamBuilder().load()
    print(f"{FusedAdamBuilder().absolute_name()} ready in {time.time() - start:.1f} s")
EOF
}

run_pytest() {
  # collected everywhere; on a CPU (dry run) every cuda test is reported as skipped with its reason
  AF_TEST_SESSION_BUDGET_S=$((T_PYTEST - 5)) "$python" -m pytest -m cuda -q -rs -p no:cacheprovider --durations=10 \
    --continue-on-collection-errors
}

# One command line per tool for both modes (the dry run exercises every flag); only sizes differ.
if [ "$dry" = 1 ]; then
  K_DEVICE=cpu TR_DEVICE=cpu TR_PRESET=tiny TR_SEQ=32 TR_PRECISION=fp32 TR_MICRO=2 TR_STEPS=2 TR_WARMUP=1 TR_ROUNDS=2
  PR_DEVICES=cpu PR_CLIPS=2 PR_SECONDS=1 PR_BATCH=2 PR_WORKERS="--workers 0"
else
  K_DEVICE=cuda TR_DEVICE=cuda TR_PRESET=base TR_SEQ=752 TR_PRECISION=bf16 TR_MICRO=32 TR_STEPS=12 TR_WARMUP=3 TR_ROUNDS=3
  PR_DEVICES=cuda PR_CLIPS=192 PR_SECONDS=10 PR_BATCH=32 PR_WORKERS=""  # af-prepare's default workers
fi
prepare_json="$(mktemp /tmp/af_gpu_check_prepare.XXXXXX)"  # its rows go into gpu_check.json

run_kernels() {
  # (--seq-lens/--mpc-sizes apply on the GPU; the CPU run uses the tool's tiny interpreter shapes)
  "$python" -m af_train_tools.benchmark_kernels --device "$K_DEVICE" --seq-lens 512,1024 --mpc-sizes 8192,65536 \
    --no-compile --warmup-ms 10 --rep-ms 50 --cpu-repeats 1 --out "$out"
}

run_train() {
  "$python" -m af_train_tools.benchmark_train --device "$TR_DEVICE" --mode pretrain ft1 --preset "$TR_PRESET" \
    --seq-len "$TR_SEQ" --precision "$TR_PRECISION" --micro-batch "$TR_MICRO" --steps "$TR_STEPS" \
    --warmup "$TR_WARMUP" --rounds "$TR_ROUNDS" --out "$out"
}

run_prepare() {
  # PR_WORKERS: empty, or the option and its value (unquoted on purpose)
  "$python" -m af_train_tools.benchmark_prepare --devices "$PR_DEVICES" --clips "$PR_CLIPS" \
    --clip-seconds "$PR_SECONDS" --batch-size "$PR_BATCH" $PR_WORKERS --out "$prepare_json"
}

export dry out python site T_PYTEST K_DEVICE TR_DEVICE TR_PRESET TR_SEQ TR_PRECISION TR_MICRO TR_STEPS \
  TR_WARMUP TR_ROUNDS PR_DEVICES PR_CLIPS PR_SECONDS PR_BATCH PR_WORKERS prepare_json
export -f install_wheels print_env build_ops run_pytest run_kernels run_train run_prepare
# GPU_CHECK_STEPS="pytest train" runs only those steps (default: all, in this order).
selected=" ${GPU_CHECK_STEPS:-install env ops pytest kernels train prepare} "
for step in install:T_INSTALL:install_wheels env:T_ENV:print_env ops:T_OPS:build_ops pytest:T_PYTEST:run_pytest \
            kernels:T_KERNELS:run_kernels train:T_TRAIN:run_train prepare:T_PREPARE:run_prepare; do
  IFS=: read -r name limit function <<< "$step"
  case "$selected" in *" $name "*) run_step "$name" "${!limit}" "$function" ;; esac
done
rm -rf "$shim"

finished="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
cat > "$out/gpu_check.json" <<EOF
{
  "commit": "$commit",
  "dirty": $dirty,
  "started_utc": "$started",
  "finished_utc": "$finished",
  "dry_run": $([ "$dry" = 1 ] && echo true || echo false),
  "host": "$(hostname)",
  "failed_steps": $failed,
  "steps": [$steps_json
  ],
  "prepare": $([ -s "$prepare_json" ] && cat "$prepare_json" || echo null)
}
EOF
rm -f "$prepare_json"
say ""
say "gpu_check: $failed step(s) failed; results in $out:"
ls -1 "$out" | tee -a "$logfile"
[ "$failed" = 0 ]
