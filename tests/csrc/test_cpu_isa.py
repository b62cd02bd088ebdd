"""The C++ CPU ops on every instruction-set path this CPU supports (csrc/cpu/isa.h), against the torch reference.

The path is fixed when dpar_kernels._C loads, so each path runs in a subprocess started with DPAR_CPU_ISA=<path>;
the subprocess runs this file as a script (check_every_op) and fails with the first mismatch. Float64 wherever the
op takes it, float32, and float16 / bfloat16 where the kernel reads them.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import dpar_kernels
from dpar_kernels import _extension

PATHS = ("default", "avx2", "avx512")  # lowest first
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(dpar_kernels.__file__)))  # the tree this process imports

pytestmark = pytest.mark.skipif(not _extension.HAS_CPU_OPS, reason="needs the compiled extension dpar_kernels._C")
SUPPORTED = _extension.EXTENSION.cpu_isa_supported() if _extension.HAS_CPU_OPS else []


def _run(isa: str | None, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.pop("DPAR_CPU_ISA", None)
    if isa is not None:
        env["DPAR_CPU_ISA"] = isa
    return subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("isa", SUPPORTED)
def test_every_op_matches_the_reference_on_each_path(isa):
    result = _run(isa, "check")
    assert result.returncode == 0, f"DPAR_CPU_ISA={isa}:\n{result.stdout}\n{result.stderr}"
    assert f"checked on {isa}" in result.stdout


def test_without_request_the_best_path_runs():
    result = _run(None, "isa")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [SUPPORTED[-1]]
    assert "RuntimeWarning" not in result.stderr


def test_a_higher_path_than_the_cpu_has_warns_and_runs_the_best():
    unsupported = [isa for isa in PATHS if isa not in SUPPORTED]
    for request in unsupported + ["sse9"]:  # a path above the CPU's (none on an AVX-512 CPU) and an unknown name
        result = _run(request, "isa")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [SUPPORTED[-1]], request
        assert f"DPAR_CPU_ISA={request}" in result.stderr and "RuntimeWarning" in result.stderr, result.stderr


def test_cpu_isa_is_exported():
    import dpar_kernels as dk

    assert dk.cpu_isa() in SUPPORTED


# ------------------------------------------------------------------------------------------ subprocess side

def _close(name, got, want, dtype):
    tol = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    got, want = got.double(), want.double()
    if not torch.allclose(got, want, rtol=tol, atol=tol, equal_nan=True):
        worst = ((got - want).abs().nan_to_num(nan=math.inf)).max().item()
        raise AssertionError(f"{name} ({dtype}): max abs error {worst:.3g}")


def _check_attention():
    from dpar_kernels.attention import naive

    ops = torch.ops.dpar_C
    cases = [  # (query lengths, key lengths, Hq, Hk, d): multi-block, short-query, one-query, split backward
        ([0, 1, 5, 37, 70, 130], [0, 1, 5, 37, 70, 130], 4, 2, 64),
        ([3, 17, 29], [40, 17, 64], 2, 1, 40),
        ([1, 1, 1, 1], [4, 9, 64, 65], 4, 4, 64),
        ([300], [300], 2, 1, 64),
    ]
    for dtype in (torch.float64, torch.float32):
        for lens_q, lens_k, hq, hk, d in cases:
            cu_q = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            cu_k = torch.tensor([0] + lens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            q = torch.randn(int(cu_q[-1]), hq, d, dtype=dtype)
            k = torch.randn(int(cu_k[-1]), hk, d, dtype=dtype)
            v = torch.randn(int(cu_k[-1]), hk, d, dtype=dtype)
            for causal in (True, False):
                args = (cu_q, cu_k, max(lens_q), max(lens_k), d ** -0.5, causal)
                out, lse = ops.varlen_attention(q, k, v, *args)
                ref_out, ref_lse = naive.varlen_attention(q, k, v, *args)
                name = f"varlen_attention {lens_q} {hq}/{hk} d{d} causal={causal}"
                _close(name, out, ref_out, dtype)
                _close(name + " lse", lse, ref_lse, dtype)
                dout = torch.randn_like(out)
                grads = ops.varlen_attention_backward(dout, q, k, v, out, lse, *args)
                ref_grads = naive.varlen_attention_backward(dout, q, k, v, ref_out, ref_lse, *args)
                for label, got, want in zip("qkv", grads, ref_grads):
                    _close(f"{name} d{label}", got, want, dtype)


def _check_kvcache():
    from dpar_kernels.kvcache import naive

    for dtype in (torch.float64, torch.float32):
        for batch, seqlen_q, hq, hk, d, s_max, appended in [(3, 1, 4, 2, 64, 70, True), (2, 3, 2, 1, 40, 33, False),
                                                            (2, 2, 4, 4, 16, 200, True)]:
            q = torch.randn(batch, seqlen_q, hq, d, dtype=dtype)
            k_cache = torch.randn(batch, s_max, hk, d, dtype=dtype)
            v_cache = torch.randn(batch, s_max, hk, d, dtype=dtype)
            lengths = torch.randint(0, s_max - seqlen_q, (batch,), dtype=torch.int32)
            k_new = torch.randn(batch, seqlen_q, hk, d, dtype=dtype) if appended else None
            v_new = torch.randn(batch, seqlen_q, hk, d, dtype=dtype) if appended else None
            for causal in (True, False):
                k1, v1, k2, v2 = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
                out = torch.ops.dpar_C.kvcache_attention(q, k1, v1, lengths, k_new, v_new, d ** -0.5, causal)
                ref = naive.kvcache_attention(q, k2, v2, lengths, k_new, v_new, d ** -0.5, causal)
                name = f"kvcache_attention B{batch} Sq{seqlen_q} {hq}/{hk} d{d} causal={causal}"
                _close(name, out, ref, dtype)
                _close(name + " cache", k1, k2, dtype)


def _check_entropy():
    from dpar_kernels.entropy import naive

    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        for rows, vocab in [(5, 1), (7, 63), (4, 64), (9, 1000)]:
            logits = (torch.randn(rows, vocab) * 4).to(dtype)
            logits[0, : vocab // 2] = -math.inf  # a masked vocabulary
            got = torch.ops.dpar_C.token_entropy(logits, 0.7)
            _close(f"token_entropy {rows}x{vocab}", got, naive.token_entropy(logits, 0.7), dtype)
            if vocab < 2:
                continue
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            m = torch.full((rows,), -math.inf, dtype=acc)
            s, w = torch.zeros(rows, dtype=acc), torch.zeros(rows, dtype=acc)
            for tile in logits.split(vocab // 2 + 1, dim=1):  # two vocabulary tiles, as linear_entropy merges them
                torch.ops.dpar_C.entropy_state_update(tile.contiguous(), m, s, w, 0.7)
            _close(f"entropy_state_update {rows}x{vocab}", s.log() - w / s, naive.token_entropy(logits, 0.7), dtype)


def _check_gather_scatter():
    from dpar_kernels.gather_scatter import naive

    ops = torch.ops.dpar_C
    cu = torch.tensor([0, 0, 1, 4, 4, 11, 30], dtype=torch.int32)
    total = int(cu[-1])
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        for cols in (1, 13, 64):
            x = torch.randn(total, cols).to(dtype)
            x[5, 0] = x[6, 0]  # a tie: the first token wins
            for reduce in ("max", "sum", "mean"):
                out, argmax = ops.patch_gather(x, cu, reduce, reduce == "max")
                ref_out, ref_argmax = naive.patch_gather(x, cu, reduce, reduce == "max")
                name = f"patch_gather {reduce} D{cols}"
                _close(name, out, ref_out, dtype)
                assert torch.equal(argmax, ref_argmax), name + " argmax"
                grad = torch.randn(out.shape).to(dtype)
                got = ops.patch_gather_backward(grad, cu, argmax, total, reduce)
                _close(name + " backward", got, naive.patch_gather_backward(grad, cu, ref_argmax, total, reduce),
                       dtype)
            y = torch.randn(cu.numel() - 1, cols).to(dtype)
            assert torch.equal(ops.patch_scatter(y, cu, total), naive.patch_scatter(y, cu, total)), "patch_scatter"


def _check_linear():
    for rows, depth, outputs in [(1, 64, 13), (3, 256, 768), (16, 128, 9), (32, 64, 40)]:
        x, weight = torch.randn(rows, depth), torch.randn(outputs, depth)
        for bias in (None, torch.randn(outputs)):
            got = torch.ops.dpar_C.linear(x, weight, bias)
            want = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
            _close(f"linear {rows}x{depth}->{outputs}", got, want, torch.float32)


def check_every_op():
    """Runs in the subprocess: every C++ CPU op on the path DPAR_CPU_ISA names, which must be the one running."""
    import dpar_kernels as dk

    assert dk.cpu_isa() == os.environ["DPAR_CPU_ISA"], (dk.cpu_isa(), os.environ["DPAR_CPU_ISA"])
    torch.manual_seed(0)
    for check in (_check_attention, _check_kvcache, _check_entropy, _check_gather_scatter, _check_linear):
        check()
    print(f"checked on {dk.cpu_isa()}")


if __name__ == "__main__":
    if sys.argv[1:] == ["check"]:
        check_every_op()
    elif sys.argv[1:] == ["isa"]:
        import dpar_kernels as dk

        print(dk.cpu_isa())
    else:
        raise SystemExit(f"usage: {sys.argv[0]} check|isa")
