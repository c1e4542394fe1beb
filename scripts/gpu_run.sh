#!/usr/bin/env bash
# Everything a lent GPU should do, in one call: build against the machine's torch, run the test
# suite (CUDA and Triton on the device), run the benchmarks and profile the slowest step. Results
# go to $OUT (the device tool's output folder) and to benchmarks/results/ (commit those).
#   OUT=/some/dir bash scripts/gpu_run.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu_run}
mkdir -p "$OUT" benchmarks/results
pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python -c "import dfa_kernels as dk, json; print(json.dumps(dk.build_info(), indent=1))" | tee "$OUT/build_info.json"
# the GPU-relevant tests first (CUDA kernels, fused ops, Triton, LM head), then the rest
timeout 420 python -m pytest -q -x tests/test_cuda_kernels.py tests/test_fused.py tests/test_compiled.py \
    tests/test_triton.py tests/test_lm_head.py > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"
tail -5 "$OUT/gpu_tests.log"
python benchmarks/bench_projection.py > "$OUT/projection.log" 2>&1; echo "projection rc=$?"
python benchmarks/bench_step.py > "$OUT/step.log" 2>&1; echo "step rc=$?"
python benchmarks/profile_step.py --workload lm_micro --variant dfa --out "$OUT/profile" > /dev/null 2>&1
python benchmarks/profile_step.py --workload lm_micro --variant bp --out "$OUT/profile" > /dev/null 2>&1
cp benchmarks/results/*cuda*.json dfa_kernels/backend_tables/*.json "$OUT/" 2>/dev/null
python benchmarks/summarize.py
tail -40 "$OUT/step.log"
