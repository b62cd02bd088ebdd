#!/usr/bin/env bash
# Installs torch (the CPU wheel unless a torch is already installed), triton (unless present), the package with its
# test extras, and builds the dpar_kernels._C extension in place against the installed torch (--no-build-isolation).
# Idempotent. PYTHON selects the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
if ! "$PY" -c "import triton" 2>/dev/null; then
  "$PY" -m pip install -q "triton==3.8.0"  # the version tested with torch 2.13 here; a CUDA torch brings its own
fi
"$PY" -m pip install -q "setuptools>=77" ninja build  # build: the sdist/wheel step of scripts/test.sh
"$PY" -m pip install -q --no-build-isolation -e ".[test]"
"$PY" -c "import dpar_kernels._extension as e; print('dpar_kernels extension: cpu ops', e.HAS_CPU_OPS, '| cuda ops', e.HAS_CUDA_OPS)"
