"""GPU benchmarks in bf16 at DPAR shapes (DPAR-L at 256px: 16 heads of 64, batch 32, ~1.8 tokens per patch) and
one large shape per op (work far past launch overhead).

    python -m benchmarks.gpu_bench --out DIR [--dry-run]

KV-cache decoding (dk.kvcache_attention, one new query per row): GB/s of the keys and values read, against
torch's SDPA over the whole cache (no per-row lengths: the reads are the same bytes, the work a little more).

Attention (the three DPAR shapes: the global transformer over patches, the local encoder/decoder over tokens,
the one-query patch cross-attention): forward and forward+backward TFLOP/s of dk.varlen_attention on the cuda and
triton backends against torch's flash varlen attention (torch.nn.attention.varlen.varlen_attn), padded SDPA
(benchmarks/padded_ops.py) and FlexAttention with a document mask. FLOPs are the useful ones of every
implementation alike (dk's flop formula: 4 H d per attended pair forward, 10 backward). patch_gather /
patch_scatter / token_entropy: GB/s (bytes read + written) against a device copy of the same bytes.
Writes DIR/gpu_bench.json, DIR/gpu_bench.md and DIR/results.csv (benchmarks/report.py's rows: one per figure, with
the machine and command; copy it to benchmarks/results/ to commit it) after every row. DPAR-shape calls take
microseconds, so one timing covers as many back-to-back calls as fill TIMING_S (a timing from an idle GPU would
measure Python launch gaps); the figure is the median over repeats of the time per call, after a warm-up. An
implementation that fails records its error instead of a time. --dry-run: CPU tensors, the Triton interpreter, tiny
shapes and one repeat (checks the script, its numbers mean nothing).
"""
import argparse
import functools
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import dpar_kernels as dk
from benchmarks import padded_ops
from dpar_kernels.attention.ops import attended_pairs


@dataclass(frozen=True)
class Shape:
    heads: int
    head_dim: int
    images: int
    tokens: int  # per image
    patch_ratio: float  # tokens per patch
    vocab: int
    width: int


GPU_SHAPE = Shape(heads=16, head_dim=64, images=32, tokens=256, patch_ratio=1.8, vocab=16384, width=1024)
DRY_SHAPE = Shape(heads=2, head_dim=32, images=2, tokens=16, patch_ratio=1.8, vocab=64, width=32)


@dataclass(frozen=True)
class Large:
    """One large problem per op: attention over a few long sequences, decoding against a long cache, memory-bound
    ops over many rows."""
    sequences: int
    seqlen: int
    heads: int
    kv_heads: int
    head_dim: int
    rows: int  # patch_gather/scatter tokens and token_entropy rows


GPU_LARGE = Large(sequences=8, seqlen=4096, heads=16, kv_heads=4, head_dim=128, rows=1 << 16)
DRY_LARGE = Large(sequences=1, seqlen=32, heads=2, kv_heads=1, head_dim=32, rows=64)
TIMING_S = 2e-3  # GPU time one timing aims to cover
MAX_CALLS = 200  # calls per timing at most


def patch_lengths(shape: Shape, generator) -> torch.Tensor:
    """int32 patch lengths (1..4, mean ~patch_ratio, never crossing an image) of every image, concatenated."""
    per_image = []
    for _ in range(shape.images):
        lengths, left = [], shape.tokens
        while left:
            n = min(left, int(torch.randint(1, 5, (1,), generator=generator)) if torch.rand(1, generator=generator)
                    < (shape.patch_ratio - 1) / 1.5 else 1)
            lengths.append(n)
            left -= n
        per_image += lengths
    return torch.tensor(per_image, dtype=torch.int32)


def timed(fn, device, repeats: int) -> float:
    """Median seconds per call of ``fn()``: each timing covers ``calls`` back-to-back calls, enough to fill
    TIMING_S of GPU time (one call on CPU), after a warm-up call."""
    fn()
    calls = 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        calls = max(1, min(MAX_CALLS, int(TIMING_S / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _significant(x: float) -> float:
    return float(f"{x:.4g}")


def _flex(q, k, v, cu_q, cu_k, causal, compiled: bool):
    """FlexAttention over the packed batch as one sequence with a document (and bottom-right causal) mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc_q = torch.repeat_interleave(torch.arange(cu_q.numel() - 1, device=q.device), (cu_q[1:] - cu_q[:-1]).long())
    doc_k = torch.repeat_interleave(torch.arange(cu_k.numel() - 1, device=q.device), (cu_k[1:] - cu_k[:-1]).long())
    pos_q = torch.arange(q.shape[0], device=q.device) - cu_q[:-1].long()[doc_q]
    pos_k = torch.arange(k.shape[0], device=q.device) - cu_k[:-1].long()[doc_k]
    shift = ((cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])).long()

    def mask(b, h, i, j):
        same = doc_q[i] == doc_k[j]
        return same & (pos_k[j] <= pos_q[i] + shift[doc_q[i]]) if causal else same

    block_mask = create_block_mask(mask, 1, None, q.shape[0], k.shape[0], device=q.device)
    attend = torch.compile(flex_attention) if compiled else flex_attention
    layout = lambda t: t.transpose(0, 1)[None]  # noqa: E731 - [T, H, d] -> [1, H, T, d]
    return lambda: attend(layout(q), layout(k), layout(v), block_mask=block_mask)


def attention_impls(q, k, v, cu_q, cu_k, max_q, max_k, causal, on_gpu: bool) -> dict:
    """name -> callable computing the attention output [total_q, H, d] (or its FlexAttention layout)."""
    impls = {f"dk-{b}": (lambda b=b: dk.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal,
                                                          backend=b))
             for b in (("cuda", "triton") if on_gpu else ("triton",))}
    from torch.nn.attention import varlen

    impls["torch-varlen-flash"] = lambda: varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k,
                                                             window_size=(-1, 0) if causal else (-1, -1))
    impls["padded-sdpa"] = lambda: padded_ops.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal)
    impls["flex-document-mask"] = _flex(q, k, v, cu_q, cu_k, causal, compiled=on_gpu)
    return impls


def bench_attention(shape: Shape, large: Large, device, dtype, repeats: int, generator):
    """Yields one row per (case, implementation): the three DPAR shapes, then one large causal problem."""
    lengths = patch_lengths(shape, generator)
    patches_per_image = lengths.numel() // shape.images
    tokens = torch.full((shape.images,), shape.tokens, dtype=torch.int32)
    global_lengths = torch.full((shape.images,), patches_per_image + 1, dtype=torch.int32)  # + class token
    cases = {"global (patches, causal)": (global_lengths, global_lengths, True),
             "local (tokens, causal)": (tokens, tokens, True),
             "cross (1 query per patch)": (torch.ones_like(lengths), lengths, False)}
    long = torch.full((large.sequences,), large.seqlen, dtype=torch.int32)
    cases[f"large ({large.sequences} x {large.seqlen} tokens, d {large.head_dim}, causal)"] = (long, long, True)
    prepared = []
    for case, (lq, lk, causal) in cases.items():
        heads, head_dim = (large.heads, large.head_dim) if case.startswith("large") else (shape.heads, shape.head_dim)
        cu_q, cu_k = dk.lengths_to_cu_seqlens(lq).to(device), dk.lengths_to_cu_seqlens(lk).to(device)
        q, k, v = (torch.randn(int(n), heads, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for n in (cu_q[-1], cu_k[-1], cu_k[-1]))
        flops = 4 * heads * head_dim * attended_pairs(cu_q, cu_k, causal)
        impls = attention_impls(q, k, v, cu_q, cu_k, int(lq.max()), int(lk.max()), causal, device.type == "cuda")
        prepared.append((case, int(lq.numel()), flops, impls))
    # implementation by implementation, so the slow-to-compile FlexAttention comes last if the step times out
    for name in prepared[0][3]:
        for case, sequences, flops, impls in prepared:
            fn = impls[name]

            def fwd_bwd(fn=fn):
                out = fn()
                out.backward(torch.ones_like(out))
            row = {"group": "attention", "case": case, "impl": name, "sequences": sequences}
            for mode, call, mode_flops in (("fwd", fn, flops), ("fwd+bwd", fwd_bwd, flops * 14 // 4)):
                try:
                    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                        seconds = timed(call, device, repeats)
                    row[f"{mode} TFLOP/s"] = _significant(mode_flops / seconds / 1e12)
                except Exception as exc:  # noqa: BLE001 - record why a baseline cannot run here
                    row[f"{mode} error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            yield row


def _bandwidth_row(group, case, name, fn, moved_bytes, device, repeats) -> dict:
    row = {"group": group, "case": case, "impl": name}
    try:
        row["GB/s"] = _significant(moved_bytes / timed(fn, device, repeats) / 1e9)
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return row


def bench_memory_bound(shape: Shape, large: Large, device, dtype, repeats: int, generator):
    """Yields one row per (op, shape, implementation), the device copy of the same bytes first: the DPAR shape,
    then ``large.rows`` tokens (patches from the same length distribution)."""
    yield from _memory_bound_rows(shape, "", device, dtype, repeats, generator)
    images = max(1, large.rows // shape.tokens)
    yield from _memory_bound_rows(Shape(**{**shape.__dict__, "images": images}), f" large ({images * shape.tokens} "
                                  "tokens)", device, dtype, repeats, generator)


def _memory_bound_rows(shape: Shape, suffix: str, device, dtype, repeats: int, generator):
    lengths = patch_lengths(shape, generator)
    cu = dk.lengths_to_cu_seqlens(lengths).to(device)
    total, patches, size = shape.images * shape.tokens, lengths.numel(), torch.finfo(dtype).bits // 8
    x = torch.randn(total, shape.width, device=device, dtype=dtype)
    y = torch.randn(patches, shape.width, device=device, dtype=dtype)
    logits = torch.randn(total, shape.vocab, device=device, dtype=dtype)
    backends = ("cuda", "triton") if device.type == "cuda" else ("triton",)
    cases = {
        f"patch_gather max{suffix}": ((total + patches) * shape.width * size,
                             {b: (lambda b=b: dk.patch_gather(x, cu, reduce="max", backend=b)) for b in backends}),
        f"patch_scatter{suffix}": ((total + patches) * shape.width * size,
                          {b: (lambda b=b: dk.patch_scatter(y, cu, backend=b)) for b in backends}),
        f"token_entropy{suffix}": (logits.numel() * size + total * 4,
                          {b: (lambda b=b: dk.token_entropy(logits, backend=b)) for b in backends}),
    }
    for case, (moved, impls) in cases.items():
        source = torch.empty(moved // 2, dtype=torch.uint8, device=device)
        target = torch.empty_like(source)
        copy = functools.partial(target.copy_, source)
        yield _bandwidth_row("memory", case, "device-copy", copy, moved, device, repeats)
        for b, fn in impls.items():
            yield _bandwidth_row("memory", case, f"dk-{b}", fn, moved, device, repeats)


def bench_decode(shape: Shape, large: Large, device, dtype, repeats: int, generator):
    """dk.kvcache_attention, one new query per row (the new key written in place): GB/s of cache keys and values
    read. DPAR shape: the global transformer's decode step (a batch of images, each at its own patch count);
    large: long caches with GQA. Baseline: SDPA over the whole cache ([B, H, 1, S], no lengths)."""
    patches = int(shape.tokens / shape.patch_ratio) + 1
    cases = {"DPAR global step": (shape.images, patches, shape.heads, shape.heads, shape.head_dim),
             f"large (B {large.sequences}, cache {large.seqlen})": (large.sequences, large.seqlen, large.heads,
                                                                    large.kv_heads, large.head_dim)}
    backends = ("cuda", "triton") if device.type == "cuda" else ("triton",)
    for case, (batch, capacity, heads_q, heads_kv, head_dim) in cases.items():
        k_cache, v_cache = (torch.randn(batch, capacity, heads_kv, head_dim, device=device, dtype=dtype)
                            for _ in "kv")
        q = torch.randn(batch, 1, heads_q, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, 1, heads_kv, head_dim, device=device, dtype=dtype) for _ in "kv")
        lengths = torch.randint(capacity // 2, capacity, (batch,), generator=generator, dtype=torch.int32)
        seqlens = lengths.to(device)
        moved = 2 * int(lengths.sum() + batch) * heads_kv * head_dim * torch.finfo(dtype).bits // 8
        yield _bandwidth_row("decode", case, "torch-sdpa-full-cache", _sdpa_decode(q, k_cache, v_cache), moved,
                             device, repeats)
        for b in backends:
            fn = functools.partial(dk.kvcache_attention, q, k_cache, v_cache, seqlens, k, v, backend=b)
            yield _bandwidth_row("decode", case, f"dk-{b}", fn, moved, device, repeats)


def _sdpa_decode(q, k_cache, v_cache):
    """SDPA of the one-query rows over every cache position (the strongest dense baseline; it reads no lengths)."""
    import torch.nn.functional as F

    layout = lambda t: t.transpose(1, 2)  # noqa: E731 - [B, S, H, d] -> [B, H, S, d]
    return lambda: F.scaled_dot_product_attention(layout(q), layout(k_cache), layout(v_cache),
                                                  enable_gqa=q.shape[2] != k_cache.shape[2])


def with_ratios(rows: list[dict]) -> list[dict]:
    """Adds to each dk row its ratio to the strongest baseline of the same case (attention: the best of torch
    varlen flash, padded SDPA, FlexAttention per mode; memory: the device copy; decode: SDPA over the full cache)."""
    result = []
    for row in rows:
        row = dict(row)
        if row["impl"].startswith("dk-"):
            for metric in ("fwd TFLOP/s", "fwd+bwd TFLOP/s", "GB/s"):
                best = max((r[metric] for r in rows if r["case"] == row["case"] and not r["impl"].startswith("dk-")
                            and r.get(metric)), default=None)
                if row.get(metric) and best:
                    row[f"{metric} / best baseline"] = _significant(row[metric] / best)
        result.append(row)
    return result


METRICS = ("fwd TFLOP/s", "fwd+bwd TFLOP/s", "GB/s")


def result_rows(rows: list[dict], run: dict, shape: str) -> list[dict]:
    """rows (with_ratios) -> benchmarks/report.py's FIELDS rows: one per (case, implementation, metric), dk rows
    with the strongest baseline of their case and the ratio to it."""
    from benchmarks.report import FIELDS

    out = []
    for row in rows:
        ours = row["impl"].startswith("dk-")
        for metric in METRICS:
            if row.get(metric) is None:
                continue
            baselines = [r for r in rows if r["case"] == row["case"] and not r["impl"].startswith("dk-")
                         and r.get(metric)]
            best = max(baselines, key=lambda r: r[metric])["impl"] if ours and baselines else ""
            out.append({**run, "benchmark": f"{row['group']}: {row['case']}", "shape": shape,
                        "implementation": row["impl"], "backend": row["impl"][3:] if ours else "",
                        "is_baseline": not ours, "metric": metric, "value": row[metric], "unit": metric,
                        "fastest_baseline": best, "speedup": row.get(f"{metric} / best baseline")})
    return [{field: r.get(field) for field in FIELDS} for r in out]


def markdown(rows: list[dict], header: str) -> str:
    columns = ["group", "case", "impl"] + sorted({c for r in rows for c in r} - {"group", "case", "impl"})
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    shape, dtype = (DRY_SHAPE, torch.float32) if args.dry_run else (GPU_SHAPE, torch.bfloat16)
    large = DRY_LARGE if args.dry_run else GPU_LARGE
    repeats = 1 if args.dry_run else args.repeats
    generator = torch.Generator().manual_seed(0)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    meta = {"device": device_name, "dtype": str(dtype), "shape": shape.__dict__, "large": large.__dict__,
            "repeats": repeats, "timing_s": TIMING_S, "max_calls": MAX_CALLS,
            "torch": torch.__version__, "dry_run": args.dry_run}
    os.makedirs(args.out, exist_ok=True)
    from benchmarks.machine import machine_info
    from benchmarks.report import write_csv

    command = " ".join(["python -m benchmarks.gpu_bench", *(argv if argv is not None else sys.argv[1:])])
    run = {**machine_info(), "mode": "dry-run" if args.dry_run else f"gpu {dtype}".replace("torch.", ""),
           "date": time.strftime("%Y-%m-%d", time.gmtime()), "command": command}
    shape_text = (f"{shape.images} images of {shape.tokens} tokens, {shape.heads} heads of {shape.head_dim}, "
                  f"{shape.patch_ratio} tokens per patch, V={shape.vocab}")
    rows = []
    for row in itertools.chain(bench_memory_bound(shape, large, device, dtype, repeats, generator),
                               bench_decode(shape, large, device, dtype, repeats, generator),
                               bench_attention(shape, large, device, dtype, repeats, generator)):
        rows.append(row)  # files rewritten after every row: a step timeout keeps what was measured
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
            json.dump({"meta": meta, "rows": with_ratios(rows)}, f, indent=1)
        with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
            f.write(markdown(with_ratios(rows), f"GPU benchmarks on {device_name} ({dtype}, {shape})"))
        write_csv(result_rows(with_ratios(rows), run, shape_text), os.path.join(args.out, "results.csv"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
