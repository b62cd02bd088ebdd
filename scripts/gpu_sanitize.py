"""A short run of every CUDA kernel, forward and backward, for ``compute-sanitizer --tool memcheck``.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 --report-api-errors no \
        python scripts/gpu_sanitize.py [--backend cuda[,triton]] [--only TEXT]

Small shapes with empty and one-token segments, strided inputs, fp32/fp16/bf16, then the same kernels on offsets
the public ops would reject (past the end of the data, decreasing), sent straight to the custom ops: the kernels
clamp their own indices, so memcheck must stay clean (the numbers may be wrong). Prints one line per call.
--device cpu with TRITON_INTERPRET=1, --backend triton and --quick (fp32, fewer shapes) runs the same calls on CPU
(the dry run of scripts/gpu_check.sh). --skip TEXT leaves out the calls whose name contains TEXT, --only TEXT keeps
only those (e.g. one small attention forward+backward for racecheck and synccheck). Without torch's caching
allocator (PYTORCH_NO_CUDA_MEMORY_CACHING=1) every tensor is its own allocation, so memcheck sees small overruns.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import dpar_kernels as dk  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cu(lengths, device) -> torch.Tensor:
    return dk.lengths_to_cu_seqlens(torch.tensor(lengths, dtype=torch.int32)).to(device)


def entropy_calls(backend, device, dtypes, vocabs=(7, 2049, 16384)):
    for dtype in dtypes:
        for vocab in vocabs:  # one warp per row, one block per row
            logits = torch.randn(9, vocab + 3, device=device).to(dtype)[:, 3:]  # unaligned rows
            logits[0, :16] = float("nan")
            logits[1, ::2] = float("-inf")
            yield f"token_entropy {dtype} V={vocab}", lambda logits=logits: dk.token_entropy(logits, backend=backend)
        hidden, weight = torch.randn(33, 64, device=device).to(dtype), torch.randn(1000, 64, device=device).to(dtype)
        yield f"linear_entropy {dtype}", lambda h=hidden, w=weight: dk.linear_entropy(h, w, backend=backend)


def gather_scatter_calls(backend, device, dtypes, widths=(1, 7, 64)):
    cu = _cu([0, 1, 3, 0, 40, 2], device)
    for dtype in dtypes:
        for cols in widths:
            x = torch.randn(46, cols + 3, device=device).to(dtype)[:, 2:2 + cols].requires_grad_()
            for reduce in ("max", "sum", "mean"):
                def gather(x=x, reduce=reduce):
                    out = dk.patch_gather(x, cu, reduce=reduce, backend=backend)
                    out.backward(torch.ones_like(out))
                yield f"patch_gather {reduce} {dtype} D={cols} fwd+bwd", gather
            y = torch.randn(6, cols, device=device).to(dtype).requires_grad_()

            def scatter(y=y):
                out = dk.patch_scatter(y, cu, backend=backend)
                out.backward(torch.ones_like(out))
            yield f"patch_scatter {dtype} D={cols} fwd+bwd", scatter


def attention_calls(backend, device, dtypes, head_dims=(32, 64, 80, 96, 128)):
    lengths_q, lengths_k = [0, 1, 70, 3, 0, 5], [4, 1, 70, 0, 0, 9]
    cu_q, cu_k = _cu(lengths_q, device), _cu(lengths_k, device)
    for dtype in dtypes:
        for d in head_dims:
            for causal in (True, False):
                qkv = torch.randn(sum(lengths_q), 8, d + 8, device=device).to(dtype)  # fused, strided slices
                q = qkv[:, :4, :d].detach().requires_grad_()
                k, v = (torch.randn(sum(lengths_k), 2, d, device=device).to(dtype).requires_grad_() for _ in "kv")

                def attention(q=q, k=k, v=v, causal=causal):
                    out = dk.varlen_attention(q, k, v, cu_q, cu_k, 70, 70, causal=causal, backend=backend)
                    out.backward(torch.ones_like(out))
                yield f"varlen_attention {dtype} d={d} causal={causal} fwd+bwd", attention


def kvcache_calls(backend, device, dtypes, head_dims=(64, 128)):
    for dtype in dtypes:
        for d in head_dims:
            q = torch.randn(3, 2, 8, d, device=device).to(dtype)
            k_cache, v_cache = (torch.randn(3, 300, 2, d, device=device).to(dtype) for _ in "kv")
            k, v = (torch.randn(3, 2, 2, d, device=device).to(dtype) for _ in "kv")
            seqlens = torch.tensor([0, 17, 299], dtype=torch.int32, device=device)  # the last overflows by one

            def decode(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, seqlens=seqlens):
                dk.kvcache_attention(q, k_cache, v_cache, seqlens, k, v, causal=True, backend=backend)
            yield f"kvcache_attention {dtype} d={d}", decode


def bad_offset_calls(backend, device):
    """Offsets the public ops reject, straight into the custom ops: wrong numbers allowed, no stray access."""
    x = torch.randn(10, 8, device=device)
    bad = torch.tensor([0, 7, 3, 500], dtype=torch.int32, device=device)  # decreasing, then past the end
    yield "patch_gather bad offsets", lambda: torch.ops.dpar.patch_gather(x, bad, "max", True, backend)
    yield "patch_scatter bad offsets", lambda: torch.ops.dpar.patch_scatter(torch.randn(3, 8, device=device), bad,
                                                                             10, backend)
    q = torch.randn(10, 2, 64, device=device, dtype=torch.float16)
    yield "varlen_attention bad offsets", lambda: torch.ops.dpar.varlen_attention(q, q, q, bad, bad, 500, 500, 0.125,
                                                                                   True, backend)
    cache = torch.randn(2, 16, 2, 64, device=device, dtype=torch.float16)
    lengths = torch.tensor([-5, 1 << 30], dtype=torch.int32, device=device)  # negative and far past S_max
    yield "kvcache_attention bad lengths", lambda: dk.kvcache_attention(
        torch.randn(2, 3, 2, 64, device=device, dtype=torch.float16), cache, cache.clone(), lengths,
        torch.randn(2, 3, 2, 64, device=device, dtype=torch.float16),
        torch.randn(2, 3, 2, 64, device=device, dtype=torch.float16), backend=backend)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="cuda", help="cuda, triton or both: cuda,triton")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="fp32 only, fewer shapes (the CPU dry run)")
    parser.add_argument("--skip", action="append", default=[], help="leave out calls whose name contains this")
    parser.add_argument("--only", action="append", default=[], help="run only calls whose name contains this")
    args = parser.parse_args(argv)
    backends = args.backend.split(",")
    if not set(backends) <= {"cuda", "triton"}:
        parser.error(f"--backend takes cuda, triton or cuda,triton, got {args.backend!r}")
    device = torch.device(args.device)
    dtypes = DTYPES[:1] if args.quick else DTYPES
    calls, checked = [], set()
    for backend in backends:
        calls += [(f"[{backend}] {name}", call) for name, call in (
            *entropy_calls(backend, device, dtypes, (7, 2049) if args.quick else (7, 2049, 16384)),
            *gather_scatter_calls(backend, device, dtypes, (7,) if args.quick else (1, 7, 64)),
            *attention_calls(backend, device, dtypes, (32,) if args.quick else (32, 64, 80, 96, 128)),
            *kvcache_calls(backend, device, dtypes, (64,) if args.quick else (64, 128)),
            *bad_offset_calls(backend, device))]
        checked |= {f"[{backend}] {name}" for name, _ in bad_offset_calls(backend, device)}
    calls = [(name, call) for name, call in calls if not any(text in name for text in args.skip)
             and (not args.only or any(text in name for text in args.only))]
    if not calls:
        parser.error("no call matches --only/--skip")
    for name, call in calls:
        try:
            call()
            outcome = "ok"
        except (ValueError, TypeError) as exc:  # a clean refusal of bad offsets is fine; memcheck judges the rest
            if name not in checked:
                raise
            outcome = f"refused: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"{name}: {outcome}", flush=True)
    print(f"{len(calls)} calls done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
