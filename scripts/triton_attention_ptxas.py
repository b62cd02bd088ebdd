"""Compiles the Triton varlen-attention kernels for an NVIDIA GPU without one, and reports ptxas registers/spills.

    python scripts/triton_attention_ptxas.py [--quick] [--arch 90]

Each kernel is compiled by Triton's NVIDIA backend to PTX with the tiles that dpar_kernels would launch on an
H100 (_GPU_TILES), then assembled by the ptxas bundled with Triton. The full run covers fp16/bf16/fp32 inputs,
head dims 64/80/128 and causal or not; --quick covers bf16 d=128 causal and fp32 d=80 non-causal (this is what
tests/test_attention_triton.py runs). Exits 1 if a kernel fails to compile or spills registers. The
interpreter tests cannot catch either, and cannot run bf16 at all.
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
from triton.compiler import ASTSource  # noqa: E402

from dpar_kernels.attention import triton_kernels as tk  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
KERNELS = {"forward": tk._forward_kernel, "dkdv": tk._dkdv_kernel, "dq": tk._dq_kernel}


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


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill-store bytes) that ptxas reports for ``ptx``."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
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


def compile_kernel(kind: str, dtype: str, head_dim: int, causal: bool, arch: int) -> int:
    """Compiles one kernel with its table tiles; prints a line and returns its spill bytes."""
    probe = torch.empty(0, 1, head_dim, dtype=DTYPES[dtype])
    tiles = tk._GPU_TILES[kind][(probe.dtype == torch.float32, head_dim > 64)]
    options = tk._constants(probe, causal, tiles)
    launch = {"num_warps": options.pop("num_warps"), "num_stages": options.pop("num_stages")}
    fn = KERNELS[kind]
    start = time.time()
    kernel = triton.compile(ASTSource(fn, _signature(fn, dtype, options), options),
                            target=GPUTarget("cuda", arch, 32), options=launch)
    registers, spills = _ptxas_report(kernel.asm["ptx"], arch)
    print(f"{kind:8s} {dtype} d={head_dim:<3d} causal={causal!s:5s} M={tiles.m:<3d} N={tiles.n:<3d} "
          f"warps={tiles.warps} stages={tiles.stages} smem={kernel.metadata.shared:6d} registers={registers} "
          f"spill={spills} ({time.time() - start:.1f}s)", flush=True)
    return spills


def compile_delta_kernel(dtype: str, arch: int) -> int:
    options = {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_T": tk._DELTA_ROWS}
    kernel = triton.compile(ASTSource(tk._delta_kernel, _signature(tk._delta_kernel, dtype, options), options),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": tk._DELTA_WARPS})
    registers, spills = _ptxas_report(kernel.asm["ptx"], arch)
    print(f"delta    {dtype} d=128 registers={registers} spill={spills}", flush=True)
    return spills


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two configurations instead of all")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100) or 80 (A100)")
    args = parser.parse_args(argv)
    if args.quick:
        configs = [("bf16", 128, True), ("fp32", 80, False)]
    else:
        configs = [(dtype, d, causal) for dtype in DTYPES for d in (64, 80, 128) for causal in (True, False)]
    spills = compile_delta_kernel("bf16", args.arch)
    for dtype, head_dim, causal in configs:
        for kind in KERNELS:
            spills += compile_kernel(kind, dtype, head_dim, causal, args.arch)
    if spills:
        print(f"register spills: {spills} bytes in total")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
