#!/usr/bin/env bash
# The Triton tests under the newest Triton release, beside the CI pin (pyproject's [triton] extra, installed by
# scripts/setup.sh): creates (or reuses) a virtual environment that sees the installed packages
# (--system-site-packages) and holds only the newest triton, then runs the interpreter tests of every Triton
# kernel family and the GPU compile check (scripts/triton_attention_ptxas.py through tests/ops/test_attention_triton.py).
#   bash scripts/test_triton_latest.sh [--full] [PYTEST ARGS...]
# --full runs every Triton test of tests/ops (pytest tests/ops -k triton) instead of the quick selection.
# TRITON_VERSION pins another release (e.g. TRITON_VERSION=3.6.0); TRITON_LATEST_VENV sets the environment's path.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${TRITON_LATEST_VENV:-${TMPDIR:-/tmp}/dpar-triton-latest}
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "triton${TRITON_VERSION:+==$TRITON_VERSION}"
"$VENV/bin/python" -c "import triton; print('triton', triton.__version__, 'from', triton.__file__)"
if [ "${1:-}" = "--full" ]; then
  shift
  selection=(tests/ops -k triton)
else
  selection=(tests/ops/test_attention_triton.py tests/ops/test_kvcache.py tests/ops/test_gpu_decode_plan.py
             tests/ops/test_entropy.py tests/ops/test_gather_scatter.py tests/ops/test_flash_attn_compat.py -k
             "triton or test_attention_triton or test_gpu_decode_plan")
fi
TRITON_INTERPRET=1 PYTHONPATH="$PWD" "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${selection[@]}" "$@"
