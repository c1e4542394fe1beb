#!/usr/bin/env bash
# What a lent GPU should run: build against the machine's torch, the test suite on the device, the
# benchmark suite, a profile of the LM step. Results go to $OUT (the device tool's output folder)
# and to benchmarks/results/, benchmarks/plots/, dfa_kernels/backend_tables/ (commit those).
# The device tool allows 10 minutes per command, so each stage is one call (the build is kept):
#   OUT=$OUT bash scripts/gpu_run.sh build   # then: test, bench, profile   (no argument: all four)
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu_run}
mkdir -p "$OUT"
stage() { [ "${1:-all}" = all ] || [ "${1:-all}" = "$2" ]; }
if stage "${1:-all}" build; then
  pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  python -c "import dfa_kernels as dk, json; print(json.dumps(dk.build_info(), indent=1))" | tee "$OUT/build_info.json"
fi
if stage "${1:-all}" test; then
  # the GPU-relevant files first (CUDA kernels, fused ops, Triton, LM head)
  timeout 540 python -m pytest -q tests/test_cuda_kernels.py tests/test_fused.py tests/test_compiled.py \
      tests/test_triton.py tests/test_lm_head.py > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"
  tail -15 "$OUT/gpu_tests.log"
fi
if stage "${1:-all}" bench; then
  # stops starting new measurements after --time-budget seconds; JSON is written as it goes
  timeout 560 dfa-kernels bench --device cuda --out "$OUT" --no-progress > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; tail -40 "$OUT/bench.log"
fi
if stage "${1:-all}" profile; then
  for variant in dfa bp; do
    python benchmarks/profile_step.py --workload lm_micro --variant "$variant" --out "$OUT/profile" > /dev/null 2>&1
  done
  tar czf "$OUT/profile.tgz" -C "$OUT" profile && rm -rf "$OUT/profile"
fi
