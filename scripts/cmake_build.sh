#!/usr/bin/env bash
# Configures and builds the C++ library (build/cmake/libdfa_kernels.so) with CMake against the
# installed torch. Extra arguments go to the configure step, e.g. -DDFA_KERNELS_WITH_CUDA=ON.
# Environment: PYTHON (default python), JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
TORCH_PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DPython3_EXECUTABLE="$(command -v "$PYTHON")" "$@"
cmake --build build/cmake -j"${JOBS:-2}"
