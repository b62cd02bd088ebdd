#!/usr/bin/env bash
# Compile-checks the full CUDA build of dpar_kernels._C (kernels + torch bindings, sm_80 and sm_90) on a machine
# without a GPU: needs nvcc and a CUDA build of torch in a separate environment, e.g.
#   python3 -m venv /tmp/cudatorch && /tmp/cudatorch/bin/pip install torch==2.14.1
# Usage: CUDA_TORCH_PYTHON=/tmp/cudatorch/bin/python bash scripts/check_cuda_build.sh
# Builds in a temporary copy of the tree and prints which dispatch keys each op has.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${CUDA_TORCH_PYTHON:?set CUDA_TORCH_PYTHON to the python of an environment with a CUDA build of torch}
work=$(mktemp -d)
git ls-files -z | xargs -0 cp --parents -t "$work"
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
source scripts/cuda_home.sh
find_cuda_home || { echo "no CUDA toolkit found (set CUDA_HOME to its root)"; exit 1; }
cd "$work"
# the CUDA toolkit may lack the cuSPARSE/cuBLAS headers torch's CUDA headers include: use the pip wheels' copies
CPATH="$site/nvidia/cu13/include:${CPATH:-}" TORCH_CUDA_ARCH_LIST="8.0;9.0" \
  "$PY" setup.py build_ext --inplace 2>&1 | tail -3
"$PY" - <<'PY'
import torch
import dpar_kernels._extension as ext
assert ext.HAS_CUDA_OPS, "the CUDA kernels were not built"
for name in ("token_entropy", "patch_gather", "patch_gather_backward", "patch_scatter", "varlen_attention",
             "varlen_attention_backward", "kvcache_attention"):
    op = getattr(torch.ops.dpar_C, name).default
    keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), k)]
    assert keys == ["CPU", "CUDA"], (name, keys)
    print(f"{name}: {keys}")
print("CUDA build OK")
PY
rm -rf "$work"
