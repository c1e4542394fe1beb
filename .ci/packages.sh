#!/usr/bin/env bash
# The packages as users get them: the wheel and the sdist (python -m build), the wheel installed
# into a fresh venv that holds only torch and run from outside the checkout (dfa-kernels info,
# dfa-kernels demo, .ci/wheel_smoke.py), and a wheel built from the sdist alone.
#
# Run after the README's test command (.ci/run): its `pip install .` compiled the extension in this
# checkout (build/temp.*), and the wheel here reuses those objects (linked and packed, not
# recompiled). The wheel built from the sdist compiles the CPU ops only (DFA_KERNELS_FORCE_CPU=1):
# a second CUDA compile would not fit CI's time; the CUDA sources it carries are the ones the test
# command compiled (tests/test_packaging.py checks that the sdist holds every file of csrc/). It is
# built while the venv's torch installs: one is CPU bound, the other mostly disk bound.
#
# Environment: PYTHON (default python), KEEP=1 keeps the work folder (the packages, the venv: ~6 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON="${PYTHON:-python}"
work=$(mktemp -d /tmp/dfa_kernels_packages.XXXXXX)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT
step() { echo "+ [${SECONDS}s] $*"; }
quiet() {  # a command's output only when it fails
  local log=$work/step.log
  "$@" > "$log" 2>&1 || { tail -60 "$log"; echo "FAILED: $*" >&2; return 1; }
}

step "the wheel and the sdist (python -m build)"
quiet "$PYTHON" -m build --wheel --no-isolation --outdir "$work/dist" .
quiet "$PYTHON" -m build --sdist --no-isolation --outdir "$work/dist" .
ls -l "$work/dist"
wheel=$(ls "$work"/dist/dfa_kernels-*.whl)
sdist=$(ls "$work"/dist/dfa_kernels-*.tar.gz)

step "a wheel from the sdist alone, CPU ops only (in the background), and a venv with only torch"
# --no-cache-dir: never a wheel pip cached from an earlier sdist of the same version
(DFA_KERNELS_FORCE_CPU=1 "$PYTHON" -m pip wheel --no-build-isolation --no-deps --no-cache-dir "$sdist" \
   -w "$work/from_sdist" > "$work/from_sdist.log" 2>&1) &
from_sdist=$!
torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')
"$PYTHON" -m venv "$work/venv"
quiet "$work/venv/bin/pip" install "torch==$torch_version"
if ! wait $from_sdist; then tail -60 "$work/from_sdist.log"; echo "FAILED: the wheel from the sdist" >&2; exit 1; fi
step "venv ready; the sdist built"

step "the wheel in the venv, run from $work"
quiet "$work/venv/bin/pip" install "$wheel"
cd "$work"
"$work/venv/bin/dfa-kernels" info
"$work/venv/bin/dfa-kernels" demo --epochs 2 --no-progress
"$work/venv/bin/python" "$ROOT/.ci/wheel_smoke.py"

step "the wheel built from the sdist, in the same venv"
quiet "$work/venv/bin/pip" install --force-reinstall --no-deps "$work"/from_sdist/dfa_kernels-*.whl
"$work/venv/bin/python" "$ROOT/.ci/wheel_smoke.py" --cpu-only
step "packages checked"
