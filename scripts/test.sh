#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite, then the benchmarks in quick mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m pytest tests -q -x -p no:cacheprovider "$@"
