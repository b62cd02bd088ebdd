# Sourced by scripts/gpu_check.sh and scripts/check_cuda_build.sh: exports CUDA_HOME as the CUDA toolkit root.
# torch guesses the root from `nvcc` on PATH, which is wrong where that nvcc is a wrapper (the binding compile then
# fails on crt/host_config.h). Takes the first of $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, /usr/local/cuda-*
# (newest first), the directory above nvcc's resolved path, that holds bin/nvcc and include/crt/host_config.h.
# Leaves CUDA_HOME unset (and returns 1) when none does.
cuda_home_candidates() {
  local nvcc
  printf '%s\n' "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda
  ls -d /usr/local/cuda-* 2>/dev/null | sort -rV
  nvcc=$(command -v nvcc 2>/dev/null) && dirname "$(dirname "$(readlink -f "$nvcc")")"
}
find_cuda_home() {
  local dir
  while read -r dir; do
    if [ -n "$dir" ] && [ -x "$dir/bin/nvcc" ] && [ -f "$dir/include/crt/host_config.h" ]; then
      export CUDA_HOME=$dir
      return 0
    fi
  done < <(cuda_home_candidates)
  unset CUDA_HOME
  return 1
}
