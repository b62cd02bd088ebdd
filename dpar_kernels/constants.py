"""Limits of the compiled kernels, defined once (the ops, the Triton kernels and the tests read them here; the C++ and
CUDA sources have the same values, checked by tests/csrc)."""

ATTENTION_HEAD_DIMS = (32, 64, 80, 96, 128)  # varlen_attention's triton and cuda kernels; torch/cpu take any
KVCACHE_MAX_HEAD_DIM = 256  # kvcache_attention's triton and cuda kernels; torch/cpu take any
LINEAR_MAX_ROWS = 32  # dpar_C::linear's kernel (kMaxRows of csrc/cpu/linear.cpp); more rows go to at::linear
KERNEL_BACKENDS = ("triton", "cuda")  # backends that take float32/float16/bfloat16 only (no float64)
