#!/usr/bin/env bash
# One command for a lent GPU (H100/H200), <= 8 minutes including the build:
#   bash scripts/gpu_check.sh OUTDIR [--dry-run]
# 1. builds dpar_kernels._C for the present GPU arch only and fails if the CUDA ops did not build (setup.py turns
#    a failed build into a warning); 2. pytest -m gpu (every op on the cuda and triton backends, the models);
# 3. compute-sanitizer memcheck over a short run of every CUDA kernel (scripts/gpu_sanitize.py); 4. bf16
# benchmarks at DPAR shapes (benchmarks/gpu_bench.py). Each step has its own time limit and log in OUTDIR; the
# summary is OUTDIR/gpu_check.md (one table of steps, then the benchmark table) and OUTDIR/gpu_check.json.
# Exits 1 if any step failed or timed out.
# --dry-run: the same steps on CPU (Triton interpreter, tiny shapes, a subset of the GPU tests); the build and
# the sanitizer are skipped with a note. tests/packaging/test_gpu_check_script.py runs it so the script cannot rot.
# PYTHON selects the interpreter (default: python); DPAR_COMMIT names the commit where the tree has no .git.
# Time limits (s; they sum to 480) can be changed with GPU_CHECK_<STEP>_S, e.g. GPU_CHECK_BUILD_S=300.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/gpu_check.sh OUTDIR [--dry-run]}
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/steps.tsv"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# step NAME LIMIT_S LOG COMMAND...: runs COMMAND with a time limit, output to OUTDIR/LOG, one line in steps.tsv
step() {
  local name=$1 limit=$2 log=$3 start=$SECONDS status rc
  shift 3
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="timeout after ${limit}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$log" >> "$OUT/steps.tsv"
  echo "[gpu_check] $name: $status ($((SECONDS - start))s, log $OUT/$log)"
}

skip() {  # skip NAME REASON
  printf '%s\t%s\t0\t-\n' "$1" "skipped: $2" >> "$OUT/steps.tsv"
  echo "[gpu_check] $1: skipped ($2)"
}

if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1 DPAR_GPU_TESTS_DEVICE=cpu
  step environment 60 environment.log "$PY" -c "import torch, triton; print('torch', torch.__version__, \
'triton', triton.__version__, 'cuda available:', torch.cuda.is_available())"
  skip build "dry run (no GPU); the prebuilt extension is used"
  # a subset: each op once on the interpreter (fp32), one model training step
  step pytest-gpu 200 pytest.log "$PY" -m pytest -m gpu -v -p no:cacheprovider -rfEs tests/ops/test_gpu_kernels.py \
    tests/model/test_gpu_model.py -k "triton and fp32 and (rows7 or ragged_d7 or sum-ragged_d64-contiguous or d32-causal \
or only_empty or n5) or test_training_step_gpu and triton-entropy"
  skip compute-sanitizer "dry run (no GPU); the driver runs on the interpreter instead"
  step sanitizer-driver 120 sanitizer.log "$PY" scripts/gpu_sanitize.py --device cpu --backend triton --quick
  step benchmarks 120 benchmarks.log "$PY" -m benchmarks.gpu_bench --out "$OUT" --dry-run
else
  step environment "${GPU_CHECK_ENVIRONMENT_S:-20}" environment.log bash -c "nvidia-smi || true; $PY -c \"import \
torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, \
torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability())\"; git log -1 --format='commit %H' \
2>/dev/null || echo 'commit ${DPAR_COMMIT:-unknown (no .git; set DPAR_COMMIT)}'"
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  # the toolkit may lack headers that torch's CUDA headers include: add the pip wheels' copies
  EXTRA_INCLUDE=$(ls -d "$SITE"/nvidia/*/include 2>/dev/null | paste -sd: -)
  step build "${GPU_CHECK_BUILD_S:-170}" build.log env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
    CPATH="$EXTRA_INCLUDE${CPATH:+:$CPATH}" "$PY" setup.py build_ext --inplace
  step cuda-ops-built "${GPU_CHECK_OPS_S:-20}" cuda_ops.log "$PY" -c "import dpar_kernels._extension as e; \
assert e.HAS_CUDA_OPS, 'dpar_kernels._C has no CUDA ops: the build failed, see build.log'; print('CUDA ops built')"
  step pytest-gpu "${GPU_CHECK_PYTEST_S:-150}" pytest.log "$PY" -m pytest -m gpu -v -p no:cacheprovider -rfEs --durations=15
  SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
  if [ -n "$SANITIZER" ]; then
    step compute-sanitizer "${GPU_CHECK_SANITIZER_S:-50}" sanitizer.log "$SANITIZER" --tool memcheck --error-exitcode 1 \
      "$PY" scripts/gpu_sanitize.py --backend cuda
  else
    step compute-sanitizer 5 sanitizer.log bash -c "echo compute-sanitizer not found; exit 1"
  fi
  step benchmarks "${GPU_CHECK_BENCHMARKS_S:-70}" benchmarks.log "$PY" -m benchmarks.gpu_bench --out "$OUT"
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
