"""CPU entropy benchmarks.

token_entropy: N = 16*256 rows, V = 16384, fp32: the "cpu" backend vs torch eager -(softmax * log_softmax).sum(-1)
vs torch.compile of the same. linear_entropy (D = 768): the "cpu" backend vs matmul-then-entropy, with peak extra
memory (analytic bound, and the RSS high-water mark measured in a fresh subprocess). Quick mode: tiny sizes.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import dpar_kernels as dk
from dpar_kernels import _extension
from dpar_kernels.entropy import cpu_linear

from .reporting import record

QUICK = os.environ.get("DPAR_BENCH_QUICK") == "1"
N, V, D = (64, 1024, 64) if QUICK else (16 * 256, 16384, 768)
ROUNDS = 2 if QUICK else 5


def eager_entropy(logits):
    return -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)


def matmul_then_entropy(hidden, weight):
    return eager_entropy(hidden @ weight.T)


@pytest.fixture(scope="module")
def logits():
    torch.manual_seed(0)
    return torch.randn(N, V) * 3


@pytest.fixture(scope="module")
def linear_inputs():
    torch.manual_seed(0)
    return torch.randn(N, D), torch.randn(V, D) / D ** 0.5 * 3


TOKEN_IMPLS = {
    "dpar cpu backend": lambda: (lambda x: dk.token_entropy(x, backend="cpu")),
    "torch eager": lambda: eager_entropy,
    "torch.compile (inductor)": lambda: torch.compile(eager_entropy),
}


@pytest.mark.parametrize("impl", list(TOKEN_IMPLS))
def test_token_entropy_cpu(benchmark, ratios, logits, impl):
    if impl == "dpar cpu backend" and not _extension.HAS_CPU_OPS:
        pytest.skip("the C++ extension is not built")
    fn = TOKEN_IMPLS[impl]()
    out = fn(logits)  # warm-up (and compilation)
    torch.testing.assert_close(out, eager_entropy(logits), rtol=1e-4, atol=1e-4)
    record(benchmark, f"token_entropy N={N} V={V} fp32", impl, shape=f"[{N}, {V}] fp32",
           baseline=impl != "dpar cpu backend", backend="cpu" if impl == "dpar cpu backend" else "")
    benchmark.pedantic(fn, args=(logits,), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    ratios.add_time("token_entropy cpu", impl, benchmark, baseline=impl == "torch eager")


_RSS_PROBE = """
import json, sys, torch
import dpar_kernels as dk


def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


n, v, d, impl = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
hidden, weight = torch.randn(n, d), torch.randn(v, d)
with torch.no_grad():
    warm_h, warm_w = torch.randn(4, d), torch.randn(8, d)
    dk.linear_entropy(warm_h, warm_w, backend="cpu"); (warm_h @ warm_w.T).softmax(-1)  # load kernels, pools
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the high-water mark VmHWM to the current RSS
before = status_kib("VmRSS")
if impl == "dpar":
    dk.linear_entropy(hidden, weight, backend="cpu")
else:
    z = hidden @ weight.T
    (-(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1))
print(json.dumps({"peak_extra_bytes": (status_kib("VmHWM") - before) * 1024}))
"""


def measured_peak_extra_bytes(impl: str) -> int:
    """Resident-set high-water increase of one call in a fresh process (Linux /proc; ru_maxrss would inherit
    the parent's peak across fork/exec)."""
    result = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(N), str(V), str(D), impl], capture_output=True,
                            text=True, check=True, timeout=600)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


@pytest.mark.parametrize("impl", ["dpar cpu backend", "matmul-then-entropy"])
def test_linear_entropy_cpu(benchmark, ratios, linear_inputs, impl):
    if impl == "dpar cpu backend" and not _extension.HAS_CPU_OPS:
        pytest.skip("the C++ extension is not built")
    hidden, weight = linear_inputs
    fn = (lambda: dk.linear_entropy(hidden, weight, backend="cpu")) if impl == "dpar cpu backend" else (
        lambda: matmul_then_entropy(hidden, weight))
    torch.testing.assert_close(fn(), matmul_then_entropy(hidden, weight), rtol=1e-4, atol=1e-4)
    record(benchmark, f"linear_entropy N={N} V={V} D={D} fp32", impl, shape=f"[{N}, {D}] x [{V}, {D}] fp32",
           baseline=impl != "dpar cpu backend", backend="cpu" if impl == "dpar cpu backend" else "")
    benchmark.pedantic(fn, rounds=1 if not QUICK else ROUNDS, iterations=1, warmup_rounds=0)
    ratios.add_time("linear_entropy cpu", impl, benchmark, baseline=impl == "matmul-then-entropy")
    logits_bytes = N * V * 4
    if impl == "dpar cpu backend":
        tile_bytes = min(cpu_linear.ROW_CHUNK, N) * min(cpu_linear.VOCAB_CHUNK, V) * 4
        ratios.add_value("linear_entropy cpu", "analytic extra / full logits", tile_bytes / logits_bytes, "")
    if QUICK:  # tiny sizes stay below the process's allocation noise; the RSS probe is for the full mode
        return
    measured = measured_peak_extra_bytes("dpar" if impl == "dpar cpu backend" else "baseline")
    benchmark.extra_info.update(peak_extra_bytes=measured, full_logits_bytes=logits_bytes)
    ratios.add_value("linear_entropy cpu", f"{impl}: RSS peak extra", measured / 2 ** 20, "MiB")
    ratios.add_value("linear_entropy cpu", f"{impl}: extra / full logits", measured / logits_bytes, "")
