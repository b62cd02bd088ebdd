#!/usr/bin/env bash
# Installs torch (the CPU wheel unless a torch is already installed), triton (unless present), the package with its
# test extras, and builds the dpar_kernels._C extension in place against the installed torch (--no-build-isolation).
# Idempotent. PYTHON selects the interpreter. Each phase prints one line (what it does, about how long, then how long
# it took); pip's output goes to a log whose tail is shown if the phase fails (the compiler's error for the build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
source scripts/phase.sh

setup_started=$SECONDS
if ! "$PY" -c "import torch" 2>/dev/null; then
  phase "installing torch 2.13" "download-bound, 1-5 min" "$PY" -m pip install -q "torch==2.13.0"
fi
if ! "$PY" -c "import triton" 2>/dev/null; then  # the version tested with torch 2.13 here; a CUDA torch brings its own
  phase "installing triton 3.8" "download-bound, under 1 min" "$PY" -m pip install -q "triton==3.8.0"
fi
# build: the sdist/wheel step of scripts/test.sh
phase "installing the build tools (setuptools, ninja, build)" "seconds" "$PY" -m pip install -q "setuptools>=77" \
  ninja build
phase "installing dpar-kernels and its test extras, compiling dpar_kernels._C" \
  "about 1.5-3 min on 2 cores" "$PY" -m pip install -q --no-build-isolation -e ".[test]"
"$PY" -c "import dpar_kernels as dk, dpar_kernels._extension as e; print('setup: done in', $SECONDS - $setup_started,
  's | dpar_kernels extension: cpu ops', e.HAS_CPU_OPS, '| cuda ops', e.HAS_CUDA_OPS, '| CPU ISA path', dk.cpu_isa())"
