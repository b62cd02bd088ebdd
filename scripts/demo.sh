#!/usr/bin/env bash
# Sets up (scripts/setup.sh, a line per phase) and runs the pipeline demo on the photographs scikit-image ships (CPU;
# its measured times are in README.md and benchmarks/RESULTS.md). Arguments go to `dpar demo` (e.g. --full, --threads).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m dpar demo --out "${DPAR_DEMO_OUT:-out/demo}" "$@"
