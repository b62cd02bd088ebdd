#!/usr/bin/env bash
# Sets up (scripts/setup.sh), runs the test suite, then the benchmark suite in quick mode so it cannot rot.
# The extension must have built (DPAR_REQUIRE_EXTENSION=1 turns a failed build into a failing test).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
DPAR_REQUIRE_EXTENSION=1 "$PY" -m pytest tests -q -p no:cacheprovider "$@"
DPAR_BENCH_QUICK=1 "$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider
