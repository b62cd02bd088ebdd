#!/usr/bin/env bash
# One command for a lent GPU (H100/H200), <= 8 minutes including the build, no network and no pip needed:
#   bash scripts/gpu_check.sh OUTDIR [--dry-run]
# Steps (each with its own time limit, log in OUTDIR and one row in OUTDIR/steps.tsv written as it finishes):
#  environment   versions, device, commit, CUDA_HOME (found as scripts/cuda_home.sh finds it), workers
#  build         dpar_kernels._C for the present GPU arch only (DPAR_FORCE_CUDA=1: no CUDA ops is a failure), into
#                OUTDIR/build, in the background while pytest-triton runs (the Triton tests need no extension)
#  pytest-triton pytest -m gpu -k triton, in parallel with pytest-xdist (-n) so the cold Triton compiles overlap
#  extension     installs the built _C into dpar_kernels/ (after pytest-triton: no process has the old one
#                mapped) and checks that it has the CUDA ops
#  pytest-cuda   pytest -m gpu -k "not triton" (the cuda backend, the models on it)
#  memcheck      compute-sanitizer memcheck over every CUDA kernel (scripts/gpu_sanitize.py), torch's caching
#                allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so small overruns hit unallocated memory,
#                CUDA API errors of torch/Triton not counted (--report-api-errors no)
#  racecheck, synccheck   the same tools on a small attention forward+backward, cuda and triton backends
#  benchmarks    benchmarks/gpu_bench.py: DPAR shapes timed as many calls per timing, one large shape per op
# The summary is OUTDIR/gpu_check.md (steps, then benchmarks) and OUTDIR/gpu_check.json. Exits 1 if any step
# failed or timed out. The step limits (GPU_CHECK_<STEP>_S, e.g. GPU_CHECK_BUILD_S=300) overlap where steps run
# together; GPU_CHECK_TOTAL_S (default 470) caps the whole: a step never runs past it, one that cannot start is
# recorded as "no time left".
# --dry-run: the same plan on CPU (Triton interpreter, tiny shapes, a subset of the GPU tests; build, extension,
# pytest-cuda and the sanitizer tools skipped with a note). tests/packaging/test_gpu_check_script.py runs it.
# PYTHON selects the interpreter (default: python, else python3); DPAR_COMMIT names the commit where the tree has
# no .git; GPU_CHECK_WORKERS the pytest-xdist workers (default: half the cores, at most 8; 0 without pytest-xdist);
# GPU_CHECK_ARCH the arch to build for (default: the present GPU's, e.g. 9.0).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/gpu_check.sh OUTDIR [--dry-run]}
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif command -v python > /dev/null; then PY=python; else PY=python3; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/steps.tsv"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TOTAL=${GPU_CHECK_TOTAL_S:-470}
source scripts/cuda_home.sh

# step NAME LIMIT_S LOG COMMAND...: runs COMMAND with a time limit (never past TOTAL), output to OUTDIR/LOG, one
# row in steps.tsv as soon as it ends
step() {
  local name=$1 limit=$2 log=$3 start=$SECONDS status rc left
  shift 3
  left=$((TOTAL - SECONDS))
  if [ "$left" -lt 5 ]; then
    record "$name" "not run: no time left of ${TOTAL}s" 0 -
    echo "not run" > "$OUT/$name.status"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="timeout after ${limit}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  record "$name" "$status" "$((SECONDS - start))" "$log"
  echo "$status" > "$OUT/$name.status"
}

record() {  # record NAME STATUS SECONDS LOG
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUT/steps.tsv"
  echo "[gpu_check] $1: $2 ($3s, log $OUT/$4)"
}

skip() {  # skip NAME REASON
  record "$1" "skipped: $2" 0 -
}

WORKERS=${GPU_CHECK_WORKERS:-$(n=$(($(nproc) / 2)); echo $((n > 8 ? 8 : n)))}  # the build has the other half
"$PY" -c "import xdist" 2> /dev/null || WORKERS=0
XDIST=()
[ "$WORKERS" -gt 1 ] && XDIST=(-n "$WORKERS")
PYTEST=("$PY" -m pytest --tier full -m gpu -v -p no:cacheprovider -rfEs --durations=15 "${XDIST[@]}")
GPU_TESTS=(tests/ops/test_gpu_kernels.py tests/model/test_gpu_model.py)
SMALL_ATTENTION=(--only "varlen_attention torch.bfloat16 d=64 causal=True")

if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1 DPAR_GPU_TESTS_DEVICE=cpu
  step environment 60 environment.log "$PY" -c "import torch, triton; print('torch', torch.__version__, \
'triton', triton.__version__, 'cuda available:', torch.cuda.is_available(), 'pytest workers: $WORKERS')"
  skip build "dry run (no GPU); the prebuilt extension is used"
  # a subset: each op once on the interpreter (fp32), one model training step
  step pytest-triton 240 pytest_triton.log "${PYTEST[@]}" "${GPU_TESTS[@]}" -k "triton and fp32 and (rows7 or \
ragged_d7 or sum-ragged_d64-contiguous or d32-causal or only_empty or n5) or test_training_step_gpu and triton-entropy"
  skip extension "dry run (no GPU)"
  skip pytest-cuda "dry run (no GPU)"
  skip memcheck "dry run (no GPU); the driver runs on the interpreter instead"
  step sanitizer-driver 120 sanitizer.log "$PY" scripts/gpu_sanitize.py --device cpu --backend triton --quick
  skip racecheck "dry run (no GPU)"
  skip synccheck "dry run (no GPU)"
  step benchmarks 150 benchmarks.log "$PY" -m benchmarks.gpu_bench --out "$OUT" --dry-run
else
  find_cuda_home
  step environment "${GPU_CHECK_ENVIRONMENT_S:-15}" environment.log bash -c "nvidia-smi || true; $PY -c \"import \
torch, triton, numpy, setuptools; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, 'numpy', numpy.__version__, 'setuptools', setuptools.__version__, torch.cuda.get_device_name(), \
'capability', torch.cuda.get_device_capability())\"; git log -1 --format='commit %H' \
2>/dev/null || echo 'commit ${DPAR_COMMIT:-unknown (no .git; set DPAR_COMMIT)}'; echo 'CUDA_HOME=${CUDA_HOME:-not \
found}'; echo 'pytest workers: $WORKERS'; nproc"
  ARCH=${GPU_CHECK_ARCH:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
  SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  # the toolkit may lack headers that torch's CUDA headers include: add the pip wheels' copies
  EXTRA_INCLUDE=$(ls -d "$SITE"/nvidia/*/include "$SITE"/nvidia/cu*/include 2> /dev/null | sort -u | paste -sd: -)
  # setuptools < 77 rejects pyproject.toml's SPDX license fields: it then builds from a copy without pyproject.toml
  BUILD_SRC=$PWD
  if ! "$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2> /dev/null; then
    BUILD_SRC="$OUT/build/src"
    mkdir -p "$BUILD_SRC" && cp -r setup.py csrc dpar_kernels "$BUILD_SRC"/
  fi
  step build "${GPU_CHECK_BUILD_S:-200}" build.log env -C "$BUILD_SRC" TORCH_CUDA_ARCH_LIST="$ARCH" \
    MAX_JOBS="$(nproc)" DPAR_FORCE_CUDA=1 CPATH="$EXTRA_INCLUDE${CPATH:+:$CPATH}" "$PY" setup.py build_ext \
    --build-temp "$OUT/build/temp" --build-lib "$OUT/build/lib" &
  BUILD_PID=$!
  step pytest-triton "${GPU_CHECK_PYTEST_TRITON_S:-190}" pytest_triton.log "${PYTEST[@]}" "${GPU_TESTS[@]}" -k triton
  wait "$BUILD_PID"
  if [ "$(cat "$OUT/build.status" 2> /dev/null)" = ok ]; then
    # cp then mv: a rename, so no process ever maps a half-written _C
    step extension "${GPU_CHECK_EXTENSION_S:-15}" extension.log env BUILT="$OUT/build/lib/dpar_kernels" PY="$PY" \
      bash -c 'for f in "$BUILT"/_C*; do cp "$f" "dpar_kernels/.new" && mv "dpar_kernels/.new" \
"dpar_kernels/$(basename "$f")" || exit 1; done; "$PY" -c "import dpar_kernels._extension as e; \
assert e.HAS_CUDA_OPS, \"dpar_kernels._C has no CUDA ops\"; print(\"CUDA ops built\")"'
  else
    skip extension "the build did not succeed (build.log)"
  fi
  step pytest-cuda "${GPU_CHECK_PYTEST_CUDA_S:-90}" pytest_cuda.log "${PYTEST[@]}" "${GPU_TESTS[@]}" -k "not triton"
  SANITIZER=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2> /dev/null \
    || true)
  if [ -n "$SANITIZER" ]; then
    SANITIZE=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --error-exitcode 1 --report-api-errors no)
    step memcheck "${GPU_CHECK_MEMCHECK_S:-50}" memcheck.log "${SANITIZE[@]}" --tool memcheck \
      "$PY" scripts/gpu_sanitize.py --backend cuda
    step racecheck "${GPU_CHECK_RACECHECK_S:-25}" racecheck.log "${SANITIZE[@]}" --tool racecheck \
      "$PY" scripts/gpu_sanitize.py --backend cuda,triton "${SMALL_ATTENTION[@]}"
    step synccheck "${GPU_CHECK_SYNCCHECK_S:-20}" synccheck.log "${SANITIZE[@]}" --tool synccheck \
      "$PY" scripts/gpu_sanitize.py --backend cuda,triton "${SMALL_ATTENTION[@]}"
  else
    record memcheck "failed: compute-sanitizer not found" 0 -
  fi
  step benchmarks "${GPU_CHECK_BENCHMARKS_S:-80}" benchmarks.log "$PY" -m benchmarks.gpu_bench --out "$OUT"
fi

"$PY" - "$OUT" "$DRY" <<'PY'
import json, os, sys

out, dry = sys.argv[1], sys.argv[2] == "1"
steps = [dict(zip(("step", "status", "seconds", "log"), line.rstrip("\n").split("\t")))
         for line in open(os.path.join(out, "steps.tsv"))]
bench_path = os.path.join(out, "gpu_bench.json")
bench = json.load(open(bench_path)) if os.path.exists(bench_path) else None
ok = all(s["status"] == "ok" or s["status"].startswith("skipped") for s in steps)
summary = {"dry_run": dry, "ok": ok, "steps": steps, "benchmarks": bench}
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
lines = [f"# GPU check{' (dry run on CPU: nothing here is verified on a GPU)' if dry else ''}", "",
         "| step | status | seconds | log |", "|---|---|---|---|"]
lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['log']} |" for s in steps]
if bench is not None:
    lines += ["", open(os.path.join(out, "gpu_bench.md")).read()]
open(os.path.join(out, "gpu_check.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines[:len(steps) + 4]))
sys.exit(0 if ok else 1)
PY
