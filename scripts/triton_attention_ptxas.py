"""Compiles the Triton varlen-attention kernels for an NVIDIA GPU without one, and reports ptxas registers/spills.

    python scripts/triton_attention_ptxas.py [--quick] [--arch 90]

Each kernel is compiled by Triton's NVIDIA backend to PTX with the tiles that dpar_kernels launches on a GPU
(gpu_tiles: the long- and short-sequence tables, the same on every arch), then assembled by the ptxas Triton pairs
with that arch. It compiles the variant Triton runs: at launch Triton specialises every pointer and every integer
argument divisible by 16 (tt.divisibility = 16, which enables 16-byte vector loads and async copies), and so does
this script for the data pointers and the token/head strides (multiples of 16 for every supported head dim);
lse/delta strides (= total_q) and counts stay generic. The full run covers fp16/bf16/fp32 inputs, head dims
64/80/128, causal or not, long and short tiles; --quick covers bf16 d=128 causal (long and short tiles), bf16 d=64
causal short, fp16 d=128 causal, fp32 d=128 non-causal and fp32 d=80 non-causal (tests/ops/test_attention_triton.py
runs it for sm_90, and for sm_86 with --shared-memory-only). Exits 1 if a kernel fails to compile, spills registers
or needs more shared memory than the arch has. The interpreter tests cannot catch any of these, and cannot run bf16
at all.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # kernels defined under the interpreter cannot be compiled
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402

from dpar_kernels.attention import triton_kernels as tk  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
KERNELS = {"forward": tk._forward_kernel, "dkdv": tk._dkdv_kernel, "dq": tk._dq_kernel}
# Opt-in shared memory per block (bytes) by compute capability; Triton refuses to launch a kernel needing more.
SHARED_MEMORY = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
# Integer arguments not specialised: lse/delta row strides (total_q) and counts are arbitrary at runtime.
_GENERIC_INTS = ("stride_lse_h", "stride_delta_h", "n_blocks", "group", "total_q")


def _signature(fn, dtype: str, constants: dict) -> dict:
    """Triton type strings of ``fn``'s arguments: data pointers in ``dtype``, lse/delta fp32, offsets int32."""
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in ("Lse", "Delta"):
            signature[name] = "*fp32"
        elif name.startswith("cu_seqlens"):
            signature[name] = "*i32"
        elif name in ("softmax_scale", "qk_scale_log2"):
            signature[name] = "fp32"
        elif name.startswith("stride_") or name in ("n_blocks", "group", "total_q", "total_k"):
            signature[name] = "i32"
        else:
            signature[name] = "*" + dtype
    return signature


def _divisibility(fn, signature: dict, arch: int) -> dict:
    """Triton's launch-time specialisation: tt.divisibility 16 on the data pointers and the token/head strides."""
    attr = make_backend(GPUTarget("cuda", arch, 32)).parse_attr("D")
    return {(i,): attr for i, name in enumerate(fn.arg_names)
            if signature[name].startswith("*") or (signature[name] == "i32" and name not in _GENERIC_INTS)}


def _compile(fn, dtype: str, constants: dict, arch: int, launch: dict):
    signature = _signature(fn, dtype, constants)
    source = ASTSource(fn, signature, constants, _divisibility(fn, signature, arch))
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=launch)


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill-store bytes) that ptxas reports for ``ptx``."""
    ptxas = get_ptxas(arch).path  # Triton's choice: it pairs each arch with a ptxas that reads its PTX version
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        result = subprocess.run([ptxas, "-v", f"-arch=sm_{arch}{suffix}", path, "-o", path + ".cubin"],
                                capture_output=True, text=True, check=True)
    registers = int(re.search(r"Used (\d+) registers", result.stderr).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", result.stderr).group(1))
    return registers, spills


def compile_kernel(kind: str, dtype: str, head_dim: int, causal: bool, arch: int, short: bool = False) -> list[str]:
    """Compiles one kernel with the tiles used on ``arch`` for long sequences (or for short ones: every sequence
    at most tk.SHORT_SEQLEN); prints a line and returns its problems."""
    probe = torch.empty(0, 1, head_dim, dtype=DTYPES[dtype])
    longest = tk.SHORT_SEQLEN if short else 1 << 16
    tiles = tk.gpu_tiles(kind, probe.dtype, head_dim, longest, longest)
    options = tk._constants(probe, causal, tiles)
    launch = {"num_warps": options.pop("num_warps"), "num_stages": options.pop("num_stages")}
    start = time.time()
    kernel = _compile(KERNELS[kind], dtype, options, arch, launch)
    registers, spills = _ptxas_report(kernel.asm["ptx"], arch)
    name = f"{kind} {dtype} d={head_dim} causal={causal}{' short' if short else ''}"
    print(f"{kind:8s} {dtype} d={head_dim:<3d} causal={causal!s:5s} short={short!s:5s} M={tiles.m:<3d} N={tiles.n:<3d} "
          f"warps={tiles.warps} stages={tiles.stages} smem={kernel.metadata.shared:6d} registers={registers} "
          f"spill={spills} ({time.time() - start:.1f}s)", flush=True)
    return _problems(name, spills, kernel.metadata.shared, arch)


def compile_delta_kernel(dtype: str, arch: int) -> list[str]:
    options = {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_T": tk._DELTA_ROWS}
    kernel = _compile(tk._delta_kernel, dtype, options, arch, {"num_warps": tk._DELTA_WARPS})
    registers, spills = _ptxas_report(kernel.asm["ptx"], arch)
    print(f"delta    {dtype} d=128 registers={registers} spill={spills}", flush=True)
    return _problems(f"delta {dtype}", spills, kernel.metadata.shared, arch)


def _problems(name: str, spills: int, shared: int, arch: int) -> list[str]:
    found = [f"{name}: {spills} bytes of register spills"] if spills else []
    limit = SHARED_MEMORY.get(arch)
    if limit is not None and shared > limit:
        found.append(f"{name}: {shared} bytes of shared memory > {limit} on sm_{arch}")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two configurations instead of all")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100) or 80 (A100)")
    parser.add_argument("--shared-memory-only", action="store_true",
                        help="report spills but fail only when a kernel needs more shared memory than the arch has "
                             "(the tiles are tuned for sm_90; on e.g. sm_86 a few spilled bytes are expected)")
    args = parser.parse_args(argv)
    if args.quick:
        configs = [("bf16", 128, True, False), ("fp16", 128, True, False), ("fp32", 128, False, False),
                   ("fp32", 80, False, False), ("bf16", 128, True, True), ("bf16", 64, True, True)]
    else:
        configs = [(dtype, d, causal, short) for dtype in DTYPES for d in (64, 80, 128) for causal in (True, False)
                   for short in ((False,) if dtype == "fp32" else (False, True))]
    problems = compile_delta_kernel("bf16", args.arch)
    for dtype, head_dim, causal, short in configs:
        for kind in KERNELS:
            problems += compile_kernel(kind, dtype, head_dim, causal, args.arch, short)
    if args.shared_memory_only:
        problems = [p for p in problems if "shared memory" in p]
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
