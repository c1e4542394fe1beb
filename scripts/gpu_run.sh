#!/usr/bin/env bash
# What a lent GPU should run: build against the machine's torch, the test suite on the device, the
# benchmark suite, a profile of the LM step. Results go to $OUT (the device tool's output folder)
# and to benchmarks/results/, benchmarks/plots/, dfa_kernels/backend_tables/ (commit those).
# A device session has 15 minutes in all (the machine's start included) and 10 per command, so the
# stages go in two calls:
#   OUT=$OUT bash scripts/gpu_run.sh build test      # at most about 6 minutes: the build is kept
#   OUT=$OUT bash scripts/gpu_run.sh bench profile   # about 6 minutes
# (no argument: all four stages in one command).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu_run}
mkdir -p "$OUT"
stages=" ${*:-build test bench profile} "
stage() { [[ $stages == *" $1 "* ]]; }
if stage build; then
  # the device's own architecture only, not the default two (sm_80 and sm_90): a shorter build
  arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} pip install --no-build-isolation --no-deps -e . \
      > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  python -c "import dfa_kernels as dk, json; print(json.dumps(dk.build_info(), indent=1))" | tee "$OUT/build_info.json"
fi
if stage test; then
  # the GPU-relevant files first (CUDA kernels, fused ops, Triton, LM head)
  timeout 180 python -m pytest -q tests/test_cuda_kernels.py tests/test_fused.py tests/test_compiled.py \
      tests/test_triton.py tests/test_lm_head.py > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"
  tail -15 "$OUT/gpu_tests.log"
fi
if stage bench; then
  # stops starting new measurements after --time-budget seconds; JSON is written as it goes
  timeout 420 dfa-kernels bench --device cuda --time-budget 300 --out "$OUT" --no-progress > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; tail -40 "$OUT/bench.log"
fi
if stage profile; then
  for variant in dfa bp; do
    python benchmarks/profile_step.py --workload lm_micro --variant "$variant" --out "$OUT/profile" > /dev/null 2>&1
  done
  tar czf "$OUT/profile.tgz" -C "$OUT" profile && rm -rf "$OUT/profile"
fi
