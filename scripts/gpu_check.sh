#!/usr/bin/env bash
# One command for a lent GPU (H100/H200, about 9 minutes of wall time): build for the device's own
# architecture, run the CUDA and Triton tests on it, the sync-free and CUDA-graph checks, the
# projection benchmark (every backend and storage vs cuBLAS, % of peak) and the step benchmark
# (MLP, DCN, the LM in every placement: time, FLOPs, peak memory). Everything lands in $OUT: one
# log per stage, the benchmarks' JSON and plots, build_info.json and summary.json (every stage's
# status, time and the numbers that matter), and a summary is printed even when stages fail.
#
#   OUT=$OUT bash scripts/gpu_check.sh                  # every stage
#   OUT=$OUT bash scripts/gpu_check.sh build tests      # some stages (build, tests, sync, projection, step)
#   bash scripts/gpu_check.sh --dry-run                 # on a CPU: the same stages at tiny sizes, no GPU
#
# Each stage is time-boxed (`timeout`, limits below; GPU_CHECK_SCALE=0.5 halves them) and recorded
# in summary.json, failed or not; the next stage still runs (those that need the build are skipped
# when it failed). Nothing is downloaded: the build uses the installed torch (--no-build-isolation,
# --no-deps), as a device machine has no internet. Exit status: 0 when every stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
STAGES=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    build|tests|sync|projection|step) STAGES+=("$arg") ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (stages: build tests sync projection step; --dry-run)" >&2; exit 2 ;;
  esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build tests sync projection step)
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/stages.jsonl"
PY=${PYTHON:-python}
SCALE=${GPU_CHECK_SCALE:-1}
MIN_LIMIT=${GPU_CHECK_MIN_LIMIT:-10}  # seconds: the floor of a scaled limit (the tests lower it)
limit() { $PY -c "print(max($MIN_LIMIT, int($1 * $SCALE)))"; }
# seconds per stage: 520 in all, inside 9 minutes with the summary
declare -A LIMIT=([build]=$(limit 180) [tests]=$(limit 90) [sync]=$(limit 40) [projection]=$(limit 80) [step]=$(limit 130))
BUILD_OK=1

# run_stage NAME LIMIT CMD...: the command under `timeout`, its output in $OUT/NAME.log, its status
# appended to stages.jsonl.
run_stage() {
  local name=$1 secs=$2
  shift 2
  echo "== $name (limit ${secs} s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -ne 0 ] && status=failed
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timeout
  echo "   $status (rc $rc, $((SECONDS - start)) s); log: $OUT/$name.log"
  [ $status != ok ] && tail -5 "$OUT/$name.log" | sed 's/^/   | /'
  $PY - "$name" "$status" "$rc" "$((SECONDS - start))" "$secs" "$*" >> "$OUT/stages.jsonl" <<'EOF'
import json, sys
name, status, rc, seconds, limit, command = sys.argv[1:]
print(json.dumps({"stage": name, "status": status, "rc": int(rc), "seconds": int(seconds), "limit_s": int(limit),
                  "command": command}))
EOF
  [ $status = ok ]
}

skip_stage() {
  echo "== $1: skipped ($2)"
  $PY -c "import json, sys; print(json.dumps({'stage': sys.argv[1], 'status': 'skipped', 'why': sys.argv[2]}))" \
      "$1" "$2" >> "$OUT/stages.jsonl"
}

has() { [[ " ${STAGES[*]} " == *" $1 "* ]]; }

if [ $DRY = 1 ]; then
  ARCH=9.0  # no GPU: the arch an H100/H200 reports
  DEVICE=cpu
  # Nothing is built: the installed dfa_kernels runs, not the checkout's sources (which lack the
  # compiled library after `pip install .`), so the working directory stays off sys.path.
  export PYTHONSAFEPATH=1
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, whichever way the build goes
  ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null) \
      || { echo "gpu_check.sh: no CUDA GPU visible to torch (use --dry-run on a CPU)" >&2; exit 2; }
  DEVICE=cuda
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# The workloads of the step stage: the LM in every placement first, then the MLP and DCN (a dry
# run: the MLP and DCN, the same code in a fraction of the time: off a GPU, the step benchmark also
# counts the LM's FLOPs at the GPU size, slow on fake tensors; tests/test_bench.py covers the LM).
WORKLOADS=$($PY -c "
from dfa_kernels.bench import step
lms = [w for w in step.WORKLOADS if w.startswith('lm_')]
print(' '.join(([] if $DRY else lms) + [w for w in ('mlp', 'dcn') if w in step.WORKLOADS]))")
GPU_TESTS="tests/test_cuda_kernels.py tests/test_triton.py tests/test_fused.py tests/test_compiled.py tests/test_lm_head.py tests/test_project.py"

if has build; then
  if [ $DRY = 1 ]; then  # print and check the build command; the CPU build in place is kept
    run_stage build "${LIMIT[build]}" $PY -c "
import ast, pathlib
ast.parse(pathlib.Path('setup.py').read_text())
import dfa_kernels as dk
print('would run: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS pip install --no-build-isolation --no-deps -e .')
print('extension loaded:', dk.build_info()['extension_loaded'])" || BUILD_OK=0
  else
    # pip's editable install; if pip cannot (no wheel/setuptools support), the extension in place
    run_stage build "${LIMIT[build]}" bash -c "$PY -m pip install --no-build-isolation --no-deps -e . \
        || { echo 'pip install failed: building in place'; $PY setup.py build_ext --inplace; }" || BUILD_OK=0
  fi
  $PY -c "import dfa_kernels as dk, json; print(json.dumps(dk.build_info(), indent=1))" > "$OUT/build_info.json" 2>&1
fi

if has tests; then
  if [ $BUILD_OK = 0 ]; then
    skip_stage tests "the build failed"
  elif [ $DRY = 1 ]; then  # collect them: every test file imports and parametrizes
    run_stage tests "${LIMIT[tests]}" $PY -m pytest --collect-only -q -p no:cacheprovider $GPU_TESTS
  else  # the GPU cases (-k); -v: one line per test, so a run cut by the time limit says how far it got
    run_stage tests "${LIMIT[tests]}" $PY -m pytest -v -p no:cacheprovider $GPU_TESTS -k "cuda or triton or lm_head"
  fi
fi

if has sync; then
  if [ $BUILD_OK = 0 ]; then
    skip_stage sync "the build failed"
  elif [ $DRY = 1 ]; then  # the CPU counts (the GPU tests skip)
    run_stage sync "${LIMIT[sync]}" $PY -m pytest -v -p no:cacheprovider tests/test_sync_free.py -k "not triton"
  else  # set_sync_debug_mode("error") around a step, and a CUDA-graph capture of one
    run_stage sync "${LIMIT[sync]}" $PY -m pytest -v -p no:cacheprovider tests/test_sync_free.py -k "gpu"
  fi
fi

if has projection; then
  if [ $BUILD_OK = 0 ]; then
    skip_stage projection "the build failed"
  else
    size=()
    [ $DRY = 1 ] && size=(--tiny)
    budget=$(( ${LIMIT[projection]} * 3 / 4 ))  # stops starting measurements; the JSON is written as it goes
    run_stage projection "${LIMIT[projection]}" $PY -m dfa_kernels.cli bench projection --device $DEVICE \
        --time-budget $budget --out "$OUT" --no-progress "${size[@]}"
  fi
fi

if has step; then
  if [ $BUILD_OK = 0 ]; then
    skip_stage step "the build failed"
  else
    size=$([ $DRY = 1 ] && echo tiny || echo gpu)
    budget=$(( ${LIMIT[step]} * 2 / 3 ))  # no workload starts after it; the JSON is written after each
    run_stage step "${LIMIT[step]}" $PY -c "
import sys
from dfa_kernels.bench import step
res = step.run('$DEVICE', sys.argv[1:], '$size', repeats=2, out='$OUT/step_$DEVICE.json', progress=False,
               time_budget_s=$budget, timing=step.TIMING_QUICK)
step.print_table(res)" $WORKLOADS
  fi
fi

$PY scripts/gpu_check_summary.py "$OUT" $([ $DRY = 1 ] && echo --dry-run)
