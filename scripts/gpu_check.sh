#!/usr/bin/env bash
# The first GPU run: ONE command of at most 600 s on a bare H100/H200 (python3 with torch and
# triton, nvcc, 16 cores, no network), of which only the files in $OUT (at most 8, at most 2 folders
# down) and the last 12,000 characters of output come back. Stages, each time-boxed:
#
#   preflight   python3, torch, triton, nvcc, driver and GPU versions, printed first
#   build       the extension for the GPU's one architecture (pip -e, else build_ext --inplace)
#   tests       the curated GPU subset (tests/gpu_subset.txt): sync-free steps and CUDA graphs
#               first, then every op on the cuda and triton backends in every dtype; pytest-xdist
#   step        the step benchmark's MLP and DCN at the GPU size (DFA vs BP: time, FLOPs, memory)
#   lm          one LM placement of the step benchmark (GPU_CHECK_LM, default lm_micro)
#   projection  the quick projection table (every backend and storage vs cuBLAS, % of peak)
#
# Logs, JSON and plots go to a work folder (GPU_CHECK_WORK, default a new /tmp/gpu_check_work.*),
# never to the checkout; $OUT gets three files: summary.txt, summary.json and gpu_check.tar.gz (the
# whole work folder). The summary is printed last and alone says what passed, failed (with the test
# ids), timed out and measured. Exit status 0 when every stage passed, $OUT holds what comes back and
# the run kept to its budget.
#
#   OUT=$OUT bash scripts/gpu_check.sh                 # every stage, on a GPU ($OUT must be empty)
#   OUT=$OUT bash scripts/gpu_check.sh build tests     # some stages
#   OUT=/tmp/x bash scripts/gpu_check.sh --dry-run     # on a CPU: the same stages at tiny sizes, the
#                                                      # tests collected, limits x GPU_CHECK_SCALE
#   bash scripts/gpu_check.sh --check-out DIR          # only the guard on what DIR would send back
#
# The dry run fails when the run would leave more than 8 files in $OUT (or anything deeper than 2
# folders, or a name the transfer refuses), or when it took longer than the scaled budget.
# Environment: PYTHON (default python3), GPU_CHECK_SCALE (limits x this; 1 on a GPU, 0.5 in a dry
# run), GPU_CHECK_MIN_LIMIT (floor of a scaled limit, 10 s), GPU_CHECK_WORKERS (pytest-xdist
# workers, 8), GPU_CHECK_LM (lm_micro), GPU_CHECK_BENCH_AUTOTUNE (0: Triton at its fixed config in
# the benchmarks too; 1: autotuned, which compiles every config), GPU_CHECK_EXTRA_OUT_FILES (tests:
# write that many stray files into $OUT, as a misbehaving stage would, to trip the guard).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# ---------------------------------------------------------------- the guard on what comes back
# check_out DIR: what the device would send back from DIR: at most 8 plain files, none more than 2
# folders down, names of letters, digits, '.', '_' and '-', each <= 16 MiB and <= 64 MiB together
# (the transfer's limits). Prints every violation; status 1 if any.
MAX_OUT_FILES=8
check_out() {
  local dir=$1 bad=0 n odd deep names big total
  n=$(find "$dir" -type f | wc -l)
  if [ "$n" -gt $MAX_OUT_FILES ]; then
    echo "OUT guard: $n files in $dir, more than the $MAX_OUT_FILES that come back:" >&2
    find "$dir" -type f | sed "s|^$dir/|  |" | head -20 >&2
    bad=1
  fi
  odd=$(find "$dir" -mindepth 1 ! -type f ! -type d)
  [ -n "$odd" ] && { echo "OUT guard: not plain files or folders (links?), which do not come back: $odd" >&2; bad=1; }
  deep=$(find "$dir" -mindepth 4)
  [ -n "$deep" ] && { echo "OUT guard: more than 2 folders down, which does not come back: $deep" >&2; bad=1; }
  names=$(cd "$dir" && find . -mindepth 1 | sed 's|^\./||' | tr '/' '\n' | grep -v '^[A-Za-z0-9._-]*$')
  [ -n "$names" ] && { echo "OUT guard: names the transfer refuses: $names" >&2; bad=1; }
  big=$(find "$dir" -type f -size +16M)
  [ -n "$big" ] && { echo "OUT guard: files over 16 MiB: $big" >&2; bad=1; }
  total=$(find "$dir" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
  [ "$total" -gt $((64 * 1024 * 1024)) ] && { echo "OUT guard: $total bytes in all, over 64 MiB" >&2; bad=1; }
  return $bad
}

DRY=0
STAGES=()
ALL_STAGES=(preflight build tests step lm projection)
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --check-out) [ $# -ge 2 ] || { echo "gpu_check.sh: --check-out DIR" >&2; exit 2; }
                 if check_out "$2"; then echo "OUT guard: ok ($2)"; exit 0; else exit 1; fi ;;
    preflight|build|tests|step|lm|projection) STAGES+=("$1") ;;
    *) echo "gpu_check.sh: unknown argument '$1' (stages: ${ALL_STAGES[*]}; --dry-run; --check-out DIR)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=("${ALL_STAGES[@]}")
has() { [[ " ${STAGES[*]} " == *" $1 "* ]]; }

# ---------------------------------------------------------------- time
# Base limits in seconds on the GPU (x GPU_CHECK_SCALE). One command gets 600 s; the stages get 510
# of them and the summary 30 (540), leaving 60 s for each stage's 5 s of kill grace (30 s) and the
# shell's own work. Why each is what it is:
#   preflight   20  python3 importing torch and triton on a cold disk (~5-10 s), nvcc, nvidia-smi
#   build      145  nvcc for one arch, the .cu and .cpp files in parallel (MAX_JOBS = cores; each
#                   file takes ~30-90 s), plus pip's editable-install overhead
#   tests      150  ~860 tests (counted from the rules; 512 of them collect on a CPU) on 8 xdist
#                   workers: ~150 distinct Triton compiles (~1-2 s each, autotune off: one config)
#                   and the CPU references; ~400 worker-seconds expected, so ~2-3x margin. Also gets
#                   the seconds earlier stages left unused (the build rarely needs its 145).
#   step        80  MLP (8 x 4096 fp32, batch 4096) and DCN (batch 8192): 5 variants each, 3 steps
#                   alone for peak memory + 2 quick repeats; ~30 s each, the DCN not started after
#                   half the limit
#   lm          75  one GPT-2-small placement (12 x 768, T 1024, batch 8, bf16): ~50 steps of
#                   ~50-100 ms, five model builds, the FLOP count on fake tensors (~4 s); also gets
#                   the seconds left unused before it
#   projection  40  the quick table: 3 shapes x 3 backends x 2 storages x 2 dtypes plus 2
#                   project_points classes, >= 0.3 s a measurement; stops starting them at 60%
declare -A BASE=([preflight]=20 [build]=145 [tests]=150 [step]=80 [lm]=75 [projection]=40)
ELASTIC=" tests lm "
SUMMARY_S=30
COMMAND_LIMIT_S=600
KILL_GRACE=5
if [ $DRY = 1 ]; then SCALE=${GPU_CHECK_SCALE:-0.5}; else SCALE=${GPU_CHECK_SCALE:-1}; fi
MIN_LIMIT=${GPU_CHECK_MIN_LIMIT:-10}
scaled() { awk -v b="$1" -v s="$SCALE" -v m="${2:-0}" 'BEGIN { v = int(b * s); if (v < m) v = m; print v }'; }
BUDGET=0
for s in "${STAGES[@]}"; do BUDGET=$((BUDGET + BASE[$s])); done
BUDGET=$(scaled $((BUDGET + SUMMARY_S)))
T0=$SECONDS
PLANNED=0  # scaled base seconds of the stages run so far: what they were allowed, unused time included

# ---------------------------------------------------------------- folders
if [ -z "${OUT:-}" ]; then OUT=$(mktemp -d /tmp/gpu_check_out.XXXXXX); fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "gpu_check.sh: cannot create OUT=$OUT" >&2; exit 2; }
if [ -n "$(ls -A "$OUT")" ]; then
  echo "gpu_check.sh: OUT=$OUT is not empty; everything in it would come back: use an empty folder" >&2
  exit 2
fi
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check_work.XXXXXX)}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd) || { echo "gpu_check.sh: cannot create $WORK" >&2; exit 2; }
case "$WORK/" in
  "$ROOT"/*|"$OUT"/*) echo "gpu_check.sh: the work folder $WORK must be outside the checkout and OUT" >&2; exit 2 ;;
esac
: > "$WORK/stages.jsonl"

PY=${PYTHON:-python3}
command -v "$PY" > /dev/null || { echo "gpu_check.sh: no '$PY' on PATH (set PYTHON)" >&2; PY=python; }
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export MPLBACKEND=Agg
# Triton at one fixed config per kernel (no autotuning: one compile per variant, not one per
# config); the benchmarks too unless GPU_CHECK_BENCH_AUTOTUNE=1 (the summary says which).
BENCH_AUTOTUNE=${GPU_CHECK_BENCH_AUTOTUNE:-0}
if [ $DRY = 1 ]; then
  DEVICE=cpu
  SIZE=tiny
  # Nothing is built: the installed dfa_kernels runs, not the checkout's sources (which lack the
  # compiled library after `pip install .`), so the working directory stays off sys.path.
  export PYTHONSAFEPATH=1
else
  DEVICE=cuda
  SIZE=gpu
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, whichever way the build goes
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
WORKERS=${GPU_CHECK_WORKERS:-8}
LM=${GPU_CHECK_LM:-lm_micro}
SUBSET=tests/gpu_subset.txt
# the files the subset's rules name, in order
SUBSET_FILES=$(sed 's/#.*//' "$SUBSET" | awk 'NF { split($1, a, "::"); if (!seen[a[1]]++) printf "%s ", a[1] }')

# ---------------------------------------------------------------- stages
# stage_limit NAME: its scaled base; plus the seconds earlier stages left unused for an elastic
# stage; minus any overrun of earlier stages for every stage (the total stays inside the budget).
stage_limit() {
  local base bank
  base=$(scaled "${BASE[$1]}" "$MIN_LIMIT")
  bank=$((PLANNED - (SECONDS - T0)))
  if [ $bank -gt 0 ] && [[ "$ELASTIC" == *" $1 "* ]]; then base=$((base + bank)); fi
  if [ $bank -lt 0 ]; then base=$((base + bank)); fi
  [ $base -lt "$MIN_LIMIT" ] && base=$MIN_LIMIT
  echo $base
}

# run_stage NAME LIMIT CMD...: the command under `timeout` (SIGINT first, so pytest still prints
# its summary; SIGKILL 5 s later), its output in WORK/NAME.log, its status appended to stages.jsonl.
run_stage() {
  local name=$1 secs=$2
  shift 2
  echo "== $name (limit ${secs} s, at $((SECONDS - T0)) s)"
  local start=$SECONDS
  timeout -s INT --kill-after=$KILL_GRACE "$secs" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -ne 0 ] && status=failed
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && status=timeout
  echo "   $status (rc $rc, $((SECONDS - start)) s)"
  [ $status != ok ] && tail -4 "$WORK/$name.log" | cut -c1-200 | sed 's/^/   | /'
  printf '{"stage": "%s", "status": "%s", "rc": %d, "seconds": %d, "limit_s": %d, "base_s": %d}\n' \
      "$name" "$status" "$rc" "$((SECONDS - start))" "$secs" "$(scaled "${BASE[$name]}" "$MIN_LIMIT")" \
      >> "$WORK/stages.jsonl"
  PLANNED=$((PLANNED + $(scaled "${BASE[$name]}" "$MIN_LIMIT")))
  [ $status = ok ]
}

PREFLIGHT=$(cat <<'EOF'
import importlib.util, json, os, platform, shutil, subprocess, sys
print("python:", sys.executable, platform.python_version())
v = {"python": platform.python_version(), "executable": sys.executable, "cores": os.cpu_count()}
for tool, args in (("nvcc", ["--version"]), ("nvidia-smi", ["--query-gpu=name,driver_version,memory.total",
                                                            "--format=csv,noheader"])):
    exe = shutil.which(tool) or ("/usr/local/cuda/bin/nvcc" if tool == "nvcc" and os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    try:
        lines = subprocess.run([exe, *args], capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
        v[tool] = (lines[-2] if tool == "nvcc" and len(lines) > 1 else lines[-1]) if lines else "absent"
    except Exception:  # noqa: BLE001 - not installed (a CPU machine)
        v[tool] = "absent"
    print(f"{tool}: {v[tool]}")
v["plugins"] = {m: importlib.util.find_spec(m) is not None for m in ("pytest", "xdist", "pytest_timeout")}
import torch
v.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
try:
    import triton
    v["triton"] = triton.__version__
except Exception as err:  # noqa: BLE001
    v["triton"] = f"absent ({type(err).__name__})"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    v.update(gpu=p.name, capability="%d.%d" % (p.major, p.minor), sms=p.multi_processor_count,
             memory_gib=round(p.total_memory / 2**30, 1))
print(f"torch: {v['torch']} (CUDA {v['torch_cuda']}); triton: {v['triton']}; GPU: {v.get('gpu')} "
      f"sm_{v.get('capability')} {v.get('sms')} SMs; cores: {v['cores']}; plugins: {v['plugins']}")
json.dump(v, open(sys.argv[1], "w"), indent=1)
EOF
)
if has preflight; then  # versions first, before anything can fail on them
  run_stage preflight "$(stage_limit preflight)" $PY -c "$PREFLIGHT" "$WORK/versions.json"
  sed 's/^/   /' "$WORK/preflight.log"
  echo "   MAX_JOBS $MAX_JOBS; DFA_TRITON_AUTOTUNE: tests 0, benchmarks $BENCH_AUTOTUNE"
fi

json_get() { $PY -c "import json, sys; print(json.load(open(sys.argv[1])).get(sys.argv[2]) or '')" "$@" 2>/dev/null; }
if [ $DRY = 1 ]; then
  ARCH=9.0  # no GPU: the capability an H100/H200 reports
else
  ARCH=$(json_get "$WORK/versions.json" capability)
  [ -z "$ARCH" ] && ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
  if [ -z "$ARCH" ]; then
    echo "gpu_check.sh: no CUDA GPU visible to torch (use --dry-run on a CPU)" >&2
    exit 2
  fi
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
has_module() { $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)" "$1"; }

BUILD_CHECK="
import json, sys
import dfa_kernels as dk
info = dk.build_info()
json.dump(info, open(sys.argv[1], 'w'), indent=1)
print('extension loaded:', info['extension_loaded'], '| CUDA compiled:', info['cuda_compiled'], '| archs:', info['cuda_archs'])
if sys.argv[2] == 'gpu':  # the CUDA kernels, for this GPU: otherwise every CUDA test would only skip
    assert info['cuda_compiled'], 'the extension was built without its CUDA kernels: ' + str(info.get('extension_error'))
    assert any(a.split('+')[0] == '$ARCH' for a in info['cuda_archs']), 'not built for sm_$ARCH: ' + str(info['cuda_archs'])
"
if has build; then
  if [ $DRY = 1 ]; then  # check the build's inputs and print its command; the installed build runs
    run_stage build "$(stage_limit build)" bash -c '
      "$0" -c "import ast, pathlib; ast.parse(pathlib.Path(\"setup.py\").read_text())" &&
      echo "would run: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS $0 -m pip install --no-build-isolation --no-deps -e . (else $0 setup.py build_ext --inplace)" &&
      "$0" -c "$1" "$2" dry' "$PY" "$BUILD_CHECK" "$WORK/build_info.json"
  else
    # pip's editable install; if pip cannot (no wheel or setuptools support), the extension in place
    run_stage build "$(stage_limit build)" bash -c '
      { "$0" -m pip install --no-build-isolation --no-deps --no-input -e . ||
        { echo "pip install failed: building in place"; "$0" setup.py build_ext --inplace; }; } &&
      "$0" -c "$1" "$2" gpu' "$PY" "$BUILD_CHECK" "$WORK/build_info.json"
  fi
fi
# Whatever the build did, the other stages run: a failed CUDA build still leaves the Triton
# backend and the benchmarks' torch paths to measure, and the tests say what skipped and why.

if has tests; then
  if [ $DRY = 1 ]; then  # collect the subset: the rules parse, name real tests and parameters
    run_stage tests "$(stage_limit tests)" $PY -m pytest --collect-only -q -p no:cacheprovider \
        --gpu-subset $SUBSET $SUBSET_FILES
  else
    opts=(-v -rfEs --tb=short -p no:cacheprovider --durations=15 --junitxml="$WORK/tests.xml" --gpu-subset $SUBSET)
    # 8 workers of 16 cores: Triton compiles in parallel, each worker's CPU reference on 2 threads
    has_module xdist && opts+=(-n "$WORKERS")
    # a test stuck on the GPU (a kernel that never ends) ends its worker after 60 s (thread method:
    # a signal cannot interrupt a CUDA synchronize), reported with its id instead of eating the stage
    has_module pytest_timeout && opts+=(--timeout=60 --timeout-method=thread)
    run_stage tests "$(stage_limit tests)" env DFA_TRITON_AUTOTUNE=0 OMP_NUM_THREADS=2 \
        $PY -m pytest "${opts[@]}" $SUBSET_FILES
  fi
fi

# The step benchmark: run() writes its JSON after each workload (a stage cut by its limit keeps
# what it measured) and starts no workload after its time budget.
STEP_RUN="
import sys
from dfa_kernels.bench import step
budget, out, names = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
gpu = '$SIZE' == 'gpu'  # a dry run: one repeat of one step per variant (TIMING_TINY), the same code
res = step.run('$DEVICE', names, '$SIZE', repeats=2 if gpu else 1, out=out, progress=False, time_budget_s=budget,
               timing=step.TIMING_QUICK if gpu else None)
step.print_table(res)
sys.exit(1 if res['skipped'] or any(w['failed_variants'] for w in res['workloads'].values()) else 0)
"
if has step; then
  limit=$(stage_limit step)
  run_stage step "$limit" env DFA_TRITON_AUTOTUNE=$BENCH_AUTOTUNE $PY -c "$STEP_RUN" $((limit / 2)) \
      "$WORK/step_mlp_dcn.json" mlp dcn
fi
if has lm; then
  limit=$(stage_limit lm)
  run_stage lm "$limit" env DFA_TRITON_AUTOTUNE=$BENCH_AUTOTUNE $PY -c "$STEP_RUN" $((limit / 2)) \
      "$WORK/step_lm.json" "$LM"
fi

if has projection; then
  limit=$(stage_limit projection)
  psize=$([ $DRY = 1 ] && echo tiny || echo cuda)
  run_stage projection "$limit" env DFA_TRITON_AUTOTUNE=$BENCH_AUTOTUNE $PY -c "
import sys
from dfa_kernels.bench import projection
res = projection.run('$DEVICE', quick=True, out=sys.argv[1], progress=False, write_table=False,
                     time_budget_s=float(sys.argv[2]), size='$psize')
projection.print_table(res)
sys.exit(1 if res['failed'] else 0)" "$WORK/projection_${DEVICE}_quick.json" $((limit * 3 / 5))
fi

# ---------------------------------------------------------------- summary, archive, guard
[ -n "${GPU_CHECK_EXTRA_OUT_FILES:-}" ] && for i in $(seq 1 "$GPU_CHECK_EXTRA_OUT_FILES"); do
  echo "a stray file, as a stage writing into OUT would leave" > "$OUT/stray_$i.txt"
done
SUMMARY_ARGS=("$WORK" --budget "$BUDGET" --elapsed "$((SECONDS - T0))" --bench-autotune "$BENCH_AUTOTUNE")
[ $DRY = 1 ] && SUMMARY_ARGS+=(--dry-run)
# the summary's limit is not scaled down: without it nothing says what happened (it takes ~5-10 s)
timeout -s INT --kill-after=$KILL_GRACE $SUMMARY_S $PY scripts/gpu_check_summary.py "${SUMMARY_ARGS[@]}"
SUMMARY_RC=$?
if [ ! -s "$WORK/summary.txt" ]; then  # the summary script failed: the stage table at least
  echo "gpu_check_summary.py failed (rc $SUMMARY_RC); stages:"
  cat "$WORK/stages.jsonl"
fi
cp "$WORK/summary.json" "$WORK/summary.txt" "$OUT/" 2>/dev/null
tar -czf "$OUT/gpu_check.tar.gz" -C "$(dirname "$WORK")" "$(basename "$WORK")" 2>/dev/null \
    || echo "gpu_check.sh: could not archive $WORK"
ELAPSED=$((SECONDS - T0))
GUARD_OK=1
check_out "$OUT" || GUARD_OK=0
echo "OUT: $(find "$OUT" -type f -printf '%f (%s bytes) ' | head -c 600); work folder: $WORK"
OVER=0
if [ $ELAPSED -gt "$BUDGET" ]; then
  echo "BUDGET: took $ELAPSED s, over the budget of $BUDGET s (stages + summary, x$SCALE)"
  OVER=1
else
  echo "BUDGET: $ELAPSED s of $BUDGET s (x$SCALE; the command's hard limit is $COMMAND_LIMIT_S s x$SCALE)"
fi
[ $GUARD_OK = 1 ] || echo "OUT GUARD FAILED: the run leaves in OUT what would not come back (see above)"
[ $SUMMARY_RC = 0 ] && [ $GUARD_OK = 1 ] && [ $OVER = 0 ]
