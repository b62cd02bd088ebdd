#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the reference pipeline demo on the embedded default data (CPU; its wall time
# is in benchmarks/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m dpar demo --out "${DPAR_DEMO_OUT:-out/demo}" "$@"
