#!/usr/bin/env bash
# Sets up (scripts/setup.sh), runs the test suite, builds the sdist and a wheel from it once (compiles _C)
# and checks the wheel carries _C, then runs the benchmark suite in quick mode so it cannot rot.
# The extension must have built (DPAR_REQUIRE_EXTENSION=1 turns a failed build into a failing test). Last, the
# Triton tests again under the newest Triton release (scripts/test_triton_latest.sh: a venv beside the CI pin, about
# 3 CPU-minutes); DPAR_SKIP_TRITON_LATEST=1 leaves that out (e.g. offline).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
DPAR_REQUIRE_EXTENSION=1 "$PY" -m pytest tests --tier full -q -p no:cacheprovider "$@"
dist=$(mktemp -d)
"$PY" -m build --no-isolation --outdir "$dist" . > "$dist/build.log" 2>&1 || { tail -40 "$dist/build.log"; exit 1; }
"$PY" - "$dist" <<'PY'
import glob, sys, zipfile
(wheel,) = glob.glob(f"{sys.argv[1]}/*.whl")
names = zipfile.ZipFile(wheel).namelist()
assert any(n.startswith("dpar_kernels/_C.") and n.endswith(".so") for n in names), f"{wheel} has no _C"
assert "dpar_kernels/_C.build.json" in names, f"{wheel} has no _C.build.json"
assert "dpar_kernels/cpu_choice.json" in names, f"{wheel} has no cpu_choice.json (the measured CPU backend choice)"
print(f"wheel built from the sdist carries _C: {wheel}")
PY
rm -rf "$dist"
DPAR_BENCH_QUICK=1 "$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider
[ "${DPAR_SKIP_TRITON_LATEST:-0}" = 1 ] || PYTHON="$PY" bash scripts/test_triton_latest.sh
