// Varlen (block-diagonal, optionally bottom-right causal) attention: schemas + CPU kernels, flash-style.
//
// Shapes: q [total_q, Hq, d], k/v [total_k, Hk, d] (token and head strides free, stride(-1) == 1), Hq % Hk == 0,
// cu_seqlens_q/k int32 [B+1]. Query i of a sequence with Lq queries and Lk keys sees keys j <= Lk - Lq + i when
// causal. Returns out [total_q, Hq, d] (q's dtype) and lse [Hq, total_q] (float32; float64 for float64 inputs);
// a query that sees no key gets out 0 and lse -inf. Semantics exactly as dpar_kernels/attention/naive.py.
//
// Work is a flat list of tiles built from cu_seqlens, heaviest first, handed out dynamically to the threads of
// at::parallel_for (OpenMP), so one long sequence and many short ones balance. Each item owns its output rows:
// no atomics, deterministic. Forward: items (sequence, query head, block of kBlockQ queries) loop over key
// blocks of kBlockK with an online softmax, skipping key blocks above the causal diagonal. The key blocks are
// converted once per call into shared tiles when a sequence has several query blocks to reuse them; when every
// sequence's queries fit one block (short queries: patch cross-attention, decode) each item loads its own key
// blocks instead, touching only the keys it reads. Tiles of at most kRowDotRows query rows (one query per
// sequence) compute their scores as dot products with key rows, without transposing the keys. Backward, fused (the
// usual case): items (sequence, kv head) loop over key blocks, then over the query heads of the group and the
// query blocks that see the keys, computing P and dS once per tile for dQ, dK and dV. Backward, split (when one
// such item would dominate a thread's share): dK/dV items (sequence, kv head, key block) as above, then dQ items
// (sequence, query head, query block) that recompute P and dS.
// Tiles are converted to the compute type (float; double for float64) once on load; the tile math is the active
// instruction-set path's (cpu/isa.h, cpu/kernels/attention.inc).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "cpu/isa.h"
#include "cpu/kernels/tables.h"

namespace dpar {
namespace {

using cpu::kBlockK;
using cpu::kBlockQ;
using cpu::kRowDotRows;

// The tile kernels of the active instruction-set path (cpu/isa.h) for compute type T.
template <typename T>
const cpu::AttentionTiles<T>& tiles();
template <>
const cpu::AttentionTiles<float>& tiles<float>() {
  return cpu::attention_kernels().f32;
}
template <>
const cpu::AttentionTiles<double>& tiles<double>() {
  return cpu::attention_kernels().f64;
}

// ---------------------------------------------------------------------------------------------- validation

void check_heads_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must be 3-D [tokens, heads, head_dim], got ", t.dim(), "-D");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble, name,
              " must be float32, float16, bfloat16 or float64, got ", dtype);
}

// The inner loops read each head's d values contiguously; a tensor without that layout is copied once.
at::Tensor with_contiguous_head_dim(const at::Tensor& t) {
  return (t.size(2) <= 1 || t.stride(2) == 1) ? t : t.contiguous();
}

// Validates offsets cu [B+1] (int32, starting at 0, non-decreasing, ending at total) and returns them.
std::vector<int32_t> read_offsets(const at::Tensor& cu, const char* name, int64_t total) {
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1, name, " must be 1-D with at least one entry");
  TORCH_CHECK(cu.scalar_type() == at::kInt, name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK(cu.device().is_cpu(), name, " must be a CPU tensor");
  const at::Tensor contiguous = cu.contiguous();
  const int32_t* data = contiguous.data_ptr<int32_t>();
  std::vector<int32_t> offsets(data, data + contiguous.numel());
  TORCH_CHECK(offsets.front() == 0, name, " must start at 0, got ", offsets.front());
  for (size_t i = 1; i < offsets.size(); ++i) {
    TORCH_CHECK(offsets[i] >= offsets[i - 1], name, " must be non-decreasing");
  }
  TORCH_CHECK(offsets.back() == total, name, " must end at the total length ", total, ", got ", offsets.back());
  return offsets;
}

struct Problem {
  std::vector<int32_t> cu_q, cu_k;
  int64_t heads_q, heads_k, group, head_dim;
  double scale;
  bool causal;

  int64_t batch() const { return static_cast<int64_t>(cu_q.size()) - 1; }
  int64_t len_q(int64_t b) const { return cu_q[b + 1] - cu_q[b]; }
  int64_t len_k(int64_t b) const { return cu_k[b + 1] - cu_k[b]; }
  int64_t longest_q() const {
    int64_t longest = 0;
    for (int64_t b = 0; b < batch(); ++b) longest = std::max(longest, len_q(b));
    return longest;
  }
  // Keys [0, end) are visible to at least one of the queries [0, q_end) of sequence b.
  int64_t key_end(int64_t b, int64_t q_end) const {
    return causal ? std::clamp<int64_t>(len_k(b) - len_q(b) + q_end, 0, len_k(b)) : len_k(b);
  }
  // First query of sequence b that sees key `key` (len_q when none does).
  int64_t first_query(int64_t b, int64_t key) const {
    return causal ? std::clamp<int64_t>(key - (len_k(b) - len_q(b)), 0, len_q(b)) : 0;
  }
  // visible[i]: leading keys of the block [key_start, key_start + cols) seen by query q_start + i.
  void visible(int64_t b, int64_t q_start, int64_t rows, int64_t key_start, int64_t cols, int* out) const {
    const int64_t shift = len_k(b) - len_q(b) + q_start + 1 - key_start;
    for (int64_t i = 0; i < rows; ++i) {
      out[i] = static_cast<int>(causal ? std::clamp<int64_t>(shift + i, 0, cols) : cols);
    }
  }
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                     const at::Tensor& cu_seqlens_k, double softmax_scale, bool causal) {
  check_heads_tensor(q, "q");
  check_heads_tensor(k, "k");
  check_heads_tensor(v, "v");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.size(2) == k.size(2), "q and k must have the same head dim, got ", q.size(2), " and ", k.size(2));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "the number of query heads (", q.size(1),
              ") must be a multiple of the number of key/value heads (", k.size(1), ")");
  Problem p{read_offsets(cu_seqlens_q, "cu_seqlens_q", q.size(0)),
            read_offsets(cu_seqlens_k, "cu_seqlens_k", k.size(0)),
            q.size(1), k.size(1), q.size(1) / k.size(1), q.size(2), softmax_scale, causal};
  TORCH_CHECK(p.cu_q.size() == p.cu_k.size(), "cu_seqlens_q and cu_seqlens_k must describe the same number of "
              "sequences, got ", p.cu_q.size() - 1, " and ", p.cu_k.size() - 1);
  return p;
}

// -------------------------------------------------------------------------------------------- work items

struct WorkItem {
  int32_t seq, head, block;
  int64_t cost;
};

// Items (sequence, head, block) over `len(b)` rows per sequence, heaviest first; in memory order when every item
// is small (at most 1/kSmallItemShare of the total: the dynamic hand-out balances them anyway, and walking the
// sequences in order reads k and v sequentially, which is what short items are bound by).
constexpr int64_t kSmallItemShare = 64;

template <typename Length, typename Cost>
std::vector<WorkItem> make_items(int64_t batch, int64_t heads, int64_t block, Length len, Cost cost) {
  std::vector<WorkItem> items;
  int64_t total = 0, heaviest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t start = 0; start < len(b); start += block) {
      const int64_t c = cost(b, start, std::min(block, len(b) - start));
      total += c * heads;
      heaviest = std::max(heaviest, c);
      for (int64_t h = 0; h < heads; ++h) {
        items.push_back({static_cast<int32_t>(b), static_cast<int32_t>(h), static_cast<int32_t>(start / block), c});
      }
    }
  }
  if (heaviest * kSmallItemShare > total) {
    std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  }
  return items;
}

// Runs fn(item, scratch) for every item (one Scratch per thread); threads take the next items from a shared counter.
// Small problems use fewer threads: a thread gets at least kMinWorkPerThread units of work, a unit being one
// head-dim entry of one (query, key) pair (about 16k pairs at head dim 32: tens of microseconds, several times what
// waking a thread costs), and every item (loads, stores, bookkeeping) counting kWorkPerItem units besides.
constexpr int64_t kMinWorkPerThread = 1 << 19;
constexpr int64_t kWorkPerItem = 1 << 10;
// The key-tile conversion copies at least this many values per thread.
constexpr int64_t kMinCopiesPerThread = 1 << 18;

int64_t total_cost(const std::vector<WorkItem>& items) {
  int64_t total = 0;
  for (const WorkItem& item : items) total += item.cost;
  return total;
}

int64_t heaviest_cost(const std::vector<WorkItem>& items) {
  int64_t heaviest = 0;
  for (const WorkItem& item : items) heaviest = std::max(heaviest, item.cost);
  return heaviest;
}

// Threads worth waking for `items` (at most max_threads, at least 1).
int64_t threads_for(const std::vector<WorkItem>& items, int64_t head_dim, int64_t max_threads) {
  const int64_t work = total_cost(items) * std::max<int64_t>(head_dim, 1) +
                       static_cast<int64_t>(items.size()) * kWorkPerItem;
  return std::clamp<int64_t>(work / kMinWorkPerThread, 1, std::max<int64_t>(max_threads, 1));
}

template <typename Scratch, typename Fn>
void run_items(const std::vector<WorkItem>& items, int64_t head_dim, Fn fn) {
  const int64_t count = static_cast<int64_t>(items.size());
  if (count == 0) return;
  const int64_t max_threads = std::min<int64_t>(at::get_num_threads(), count);
  const int64_t threads = threads_for(items, head_dim, max_threads);
  // consecutive items in chunks of about 1/16 of a thread's share: one counter update per chunk, and neighbouring
  // output rows (and lse entries) written by one thread
  const int64_t chunk = std::max<int64_t>(1, count / (threads * 16));
  std::atomic<int64_t> next{0};
  auto work = [&](int64_t, int64_t) {
    Scratch scratch(head_dim);
    for (int64_t begin = next.fetch_add(chunk); begin < count; begin = next.fetch_add(chunk)) {
      for (int64_t i = begin; i < std::min(begin + chunk, count); ++i) fn(items[i], scratch);
    }
  };
  if (threads == 1) {
    work(0, 1);
  } else {
    at::parallel_for(0, threads, 1, work);
  }
}

// Per-thread tile buffers in the compute type; rows of head-dim vectors have the padded length dp (padding
// stays zero: loads write only the first d entries of a row).
// kt, k_rows and v_rows hold one key block for items that load their own keys (short-query forward).
template <typename acc_t>
struct Workspace {
  int64_t dp;
  std::vector<acc_t> q, dout, s, ds, acc, acc2, m, l, lse, delta, kt, k_rows, v_rows;
  std::vector<int> visible;

  explicit Workspace(int64_t d)
      : dp(cpu::padded_len<acc_t>(d)), q(kBlockQ * dp), dout(kBlockQ * dp), s(kBlockQ * kBlockK),
        ds(kBlockQ * kBlockK), acc(std::max(kBlockQ, kBlockK) * dp),
        acc2(kBlockK * dp), m(kBlockQ), l(kBlockQ), lse(kBlockQ), delta(kBlockQ), kt(d * kBlockK),
        k_rows(kBlockK * dp), v_rows(kBlockK * dp), visible(kBlockQ) {}
};

// Per-thread buffers of the fused backward. Whole-sequence buffers (all query heads of a kv-head group, rows of
// padded length dp) grow to the largest sequence; key-block tiles have fixed sizes.
template <typename acc_t>
struct FusedWorkspace {
  int64_t dp;
  std::vector<acc_t> q, dout, dq, lse, delta;          // [group * len_q][dp] / [group * len_q]
  std::vector<acc_t> kt, vt, k_rows, v_rows, s, ds, dk, dv;    // one key block
  std::vector<int> visible;

  explicit FusedWorkspace(int64_t d)
      : dp(cpu::padded_len<acc_t>(d)), kt(d * kBlockK), vt(d * kBlockK), k_rows(kBlockK * dp),
        v_rows(kBlockK * dp),
        s(kBlockQ * kBlockK), ds(kBlockQ * kBlockK), dk(kBlockK * dp), dv(kBlockK * dp), visible(kBlockQ) {}

  void reserve_queries(int64_t rows) {
    if (static_cast<int64_t>(lse.size()) >= rows) return;
    for (auto* buffer : {&q, &dout, &dq}) buffer->resize(rows * dp);
    lse.resize(rows);
    delta.resize(rows);
  }
};

// ---------------------------------------------------------------------------------------------- tile I/O

// Rows (token, head) of a [tokens, heads, d] tensor with free token/head strides.
template <typename T>
struct HeadRows {
  T* data;
  int64_t token_stride, head_stride;

  HeadRows(const at::Tensor& t)  // NOLINT: implicit on purpose, built from the op's tensors
      : data(static_cast<T*>(t.data_ptr())), token_stride(t.stride(0)), head_stride(t.stride(1)) {}
  T* row(int64_t token, int64_t head) const { return data + token * token_stride + head * head_stride; }
};

// dst [rows][ld] = src rows token0.. of `head` (d values each), times `factor`, in the compute type; the
// padding ld - d of each row is zeroed.
template <typename scalar_t, typename acc_t>
void load_rows(const HeadRows<const scalar_t>& src, int64_t token0, int64_t head, int64_t rows, int64_t d,
               acc_t factor, acc_t* dst, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* row = src.row(token0 + i, head);
    for (int64_t c = 0; c < d; ++c) dst[i * ld + c] = static_cast<acc_t>(row[c]) * factor;
    std::fill(dst + i * ld + d, dst + (i + 1) * ld, acc_t(0));
  }
}

// dst [d][kBlockK] = src rows token0 .. token0+cols transposed; columns [cols, cols rounded up to the widest
// vector) zero. The tiles read no column past that rounding (their vector count comes from cols), so the rest of
// a short block is left as it is: zeroing all kBlockK columns would cost more than the block's math.
template <typename scalar_t, typename acc_t>
void load_transposed(const HeadRows<const scalar_t>& src, int64_t token0, int64_t head, int64_t cols, int64_t d,
                     acc_t* dst) {
  constexpr int64_t W = cpu::kMaxVectorBytes / sizeof(acc_t);
  const int64_t padded_cols = std::min<int64_t>(kBlockK, (cols + W - 1) / W * W);
  if (cols < padded_cols) {
    for (int64_t c = 0; c < d; ++c) std::fill(dst + c * kBlockK + cols, dst + c * kBlockK + padded_cols, acc_t(0));
  }
  for (int64_t j = 0; j < cols; ++j) {
    const scalar_t* row = src.row(token0 + j, head);
    for (int64_t c = 0; c < d; ++c) dst[c * kBlockK + j] = static_cast<acc_t>(row[c]);
  }
}

// dst rows token0.. of `head` = src [rows][ld] (first d values) times `factor`, in the output dtype.
template <typename scalar_t, typename acc_t>
void store_rows(const acc_t* src, int64_t ld, int64_t rows, int64_t d, acc_t factor, const HeadRows<scalar_t>& dst,
                int64_t token0, int64_t head) {
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* row = dst.row(token0 + i, head);
    for (int64_t c = 0; c < d; ++c) row[c] = static_cast<scalar_t>(src[i * ld + c] * factor);
  }
}

// Grow-only per-thread buffers that KeyTiles reuses from call to call: fresh multi-megabyte allocations would
// cost a page fault per 4 KiB on every call. Holds the largest batch's converted keys until the thread exits.
template <typename acc_t>
struct KeyTileBuffers {
  std::vector<acc_t> kt, vt, k_rows, v_rows;

  static KeyTileBuffers& for_this_thread() {
    thread_local KeyTileBuffers buffers;
    return buffers;
  }
};

// Every key block of every (sequence, kv head), converted once per call into the layouts the tiles read:
// transposed [d][kBlockK] (as load_transposed) and rows [kBlockK][dp] (padding zero). The forward
// needs K transposed and V rows; the backward also V transposed and K rows.
template <typename scalar_t>
struct KeyTiles {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t d, dp, blocks = 0;
  std::vector<int64_t> first_block;  // per sequence: index of its first key block
  std::vector<acc_t>&kt, &vt, &k_rows, &v_rows;

  KeyTiles(const Problem& p, const at::Tensor& k, const at::Tensor& v, bool backward)
      : d(p.head_dim),
        dp(cpu::padded_len<acc_t>(p.head_dim)),
        kt(KeyTileBuffers<acc_t>::for_this_thread().kt),
        vt(KeyTileBuffers<acc_t>::for_this_thread().vt),
        k_rows(KeyTileBuffers<acc_t>::for_this_thread().k_rows),
        v_rows(KeyTileBuffers<acc_t>::for_this_thread().v_rows) {
    for (int64_t b = 0; b < p.batch(); ++b) {
      first_block.push_back(blocks);
      blocks += (p.len_k(b) + kBlockK - 1) / kBlockK;
    }
    const int64_t tiles = blocks * p.heads_k;
    auto grow = [](std::vector<acc_t>& buffer, int64_t size) {
      if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
    };
    grow(kt, tiles * d * kBlockK);
    grow(v_rows, tiles * kBlockK * dp);
    if (backward) {
      grow(vt, tiles * d * kBlockK);
      grow(k_rows, tiles * kBlockK * dp);
    }
    const HeadRows<const scalar_t> k_src(k), v_src(v);
    // parallel over (kv head, sequence) pairs; each loads one sequence of one head
    const int64_t units = p.batch() * p.heads_k;
    const int64_t values_per_unit = std::max<int64_t>(1, k.numel() / std::max<int64_t>(1, units));
    const int64_t grain = std::max<int64_t>(1, kMinCopiesPerThread / values_per_unit);
    at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t h = unit / p.batch(), b = unit % p.batch();
        for (int64_t key = 0; key < p.len_k(b); key += kBlockK) {
          const int64_t cols = std::min<int64_t>(kBlockK, p.len_k(b) - key), token = p.cu_k[b] + key;
          const int64_t tile = h * blocks + first_block[b] + key / kBlockK;
          load_transposed(k_src, token, h, cols, d, kt.data() + tile * d * kBlockK);
          load_rows(v_src, token, h, cols, d, acc_t(1), v_rows.data() + tile * kBlockK * dp, dp);
          if (backward) {
            load_transposed(v_src, token, h, cols, d, vt.data() + tile * d * kBlockK);
            load_rows(k_src, token, h, cols, d, acc_t(1), k_rows.data() + tile * kBlockK * dp, dp);
          }
        }
      }
    });
  }

  int64_t tile(int64_t b, int64_t kv_head, int64_t key) const {
    return kv_head * blocks + first_block[b] + key / kBlockK;
  }
  const acc_t* transposed_k(int64_t t) const { return kt.data() + t * d * kBlockK; }
  const acc_t* transposed_v(int64_t t) const { return vt.data() + t * d * kBlockK; }
  const acc_t* rows_k(int64_t t) const { return k_rows.data() + t * kBlockK * dp; }
  const acc_t* rows_v(int64_t t) const { return v_rows.data() + t * kBlockK * dp; }
};

// ------------------------------------------------------------------------------------------------ forward

template <typename scalar_t>
void forward_kernel(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& out, const at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const HeadRows<const scalar_t> q_rows(q);
  const HeadRows<scalar_t> out_rows(out);
  acc_t* lse_data = lse.data_ptr<acc_t>();
  const int64_t d = p.head_dim, total_q = q.size(0);
  const acc_t scale = static_cast<acc_t>(p.scale);

  // Shared key tiles pay off when sequences have several query blocks; short queries load per item.
  const bool per_item_keys = p.longest_q() <= kBlockQ;
  std::optional<KeyTiles<scalar_t>> keys;
  if (!per_item_keys) keys.emplace(p, k, v, /*backward=*/false);
  const HeadRows<const scalar_t> k_src(k), v_src(v);
  const auto items = make_items(
      p.batch(), p.heads_q, kBlockQ, [&](int64_t b) { return p.len_q(b); },
      [&](int64_t b, int64_t start, int64_t rows) { return rows * p.key_end(b, start + rows); });
  run_items<Workspace<acc_t>>(items, d, [&](const WorkItem& item, Workspace<acc_t>& ws) {
    const int64_t b = item.seq, h = item.head, q_start = int64_t(item.block) * kBlockQ;
    const int64_t rows = std::min<int64_t>(kBlockQ, p.len_q(b) - q_start);
    const int64_t q_token = p.cu_q[b] + q_start, kv_head = h / p.group;
    load_rows(q_rows, q_token, h, rows, d, scale, ws.q.data(), ws.dp);
    std::fill(ws.m.begin(), ws.m.begin() + rows, -std::numeric_limits<acc_t>::infinity());
    std::fill(ws.l.begin(), ws.l.begin() + rows, acc_t(0));
    std::fill(ws.acc.begin(), ws.acc.begin() + rows * ws.dp, acc_t(0));
    const int64_t key_end = p.key_end(b, q_start + rows);
    for (int64_t key = 0; key < key_end; key += kBlockK) {
      const int64_t cols = std::min<int64_t>(kBlockK, key_end - key), k_token = p.cu_k[b] + key;
      p.visible(b, q_start, rows, key, cols, ws.visible.data());
      if (!per_item_keys) {
        const int64_t tile = keys->tile(b, kv_head, key);
        tiles<acc_t>().forward(ws.q.data(), rows, d, ws.dp, keys->transposed_k(tile), keys->rows_v(tile),
                                     cols, ws.visible.data(), ws.s.data(), ws.m.data(), ws.l.data(), ws.acc.data());
        continue;
      }
      load_rows(v_src, k_token, kv_head, cols, d, acc_t(1), ws.v_rows.data(), ws.dp);
      if (rows <= kRowDotRows) {
        load_rows(k_src, k_token, kv_head, cols, d, acc_t(1), ws.k_rows.data(), ws.dp);
        tiles<acc_t>().forward_rows(ws.q.data(), rows, ws.dp, ws.k_rows.data(), ws.v_rows.data(), cols,
                                          ws.visible.data(), ws.s.data(), ws.m.data(), ws.l.data(), ws.acc.data());
      } else {
        load_transposed(k_src, k_token, kv_head, cols, d, ws.kt.data());
        tiles<acc_t>().forward(ws.q.data(), rows, d, ws.dp, ws.kt.data(), ws.v_rows.data(), cols,
                                     ws.visible.data(), ws.s.data(), ws.m.data(), ws.l.data(), ws.acc.data());
      }
    }
    for (int64_t i = 0; i < rows; ++i) {
      const bool sees_keys = ws.l[i] > 0;
      const acc_t normaliser = sees_keys ? acc_t(1) / ws.l[i] : acc_t(0);  // a row without keys stays 0
      lse_data[h * total_q + q_token + i] =
          sees_keys ? ws.m[i] + std::log(ws.l[i]) : -std::numeric_limits<acc_t>::infinity();
      for (int64_t c = 0; c < d; ++c) ws.acc[i * ws.dp + c] *= normaliser;
    }
    store_rows(ws.acc.data(), ws.dp, rows, d, acc_t(1), out_rows, q_token, h);
  });
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
                                                        const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                        int64_t max_seqlen_k, double softmax_scale, bool causal) {
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, "max_seqlen_q and max_seqlen_k must be non-negative");
  const Problem p = make_problem(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal);
  const at::Tensor q = with_contiguous_head_dim(q_in), k = with_contiguous_head_dim(k_in),
                   v = with_contiguous_head_dim(v_in);
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(lse_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attention_cpu",
                                  [&] { forward_kernel<scalar_t>(p, q, k, v, out, lse); });
  return {out, lse};
}

// ----------------------------------------------------------------------------------------------- backward

// delta [Hq, total_q] = rowsum(dout * out) per (query, head), in the compute type.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> row_dots(const at::Tensor& dout, const at::Tensor& out) {
  const HeadRows<const scalar_t> dout_rows(dout), out_rows(out);
  const int64_t tokens = dout.size(0), heads = dout.size(1), d = dout.size(2);
  std::vector<acc_t> delta(tokens * heads);
  at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        const scalar_t *a = dout_rows.row(t, h), *b = out_rows.row(t, h);
        acc_t sum = 0;
        for (int64_t c = 0; c < d; ++c) sum += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
        delta[h * tokens + t] = sum;
      }
    }
  });
  return delta;
}

template <typename scalar_t>
void backward_kernel(const Problem& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq,
                     const at::Tensor& dk, const at::Tensor& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  const HeadRows<const scalar_t> dout_rows(dout), q_rows(q);
  const HeadRows<scalar_t> dq_rows(dq), dk_rows(dk), dv_rows(dv);
  const acc_t* lse_data = lse.data_ptr<acc_t>();
  const int64_t lse_head_stride = lse.stride(0), lse_token_stride = lse.stride(1);
  const int64_t d = p.head_dim, total_q = q.size(0);
  const acc_t scale = static_cast<acc_t>(p.scale);
  const std::vector<acc_t> delta = row_dots<scalar_t, acc_t>(dout, out);

  // Query rows [q_start, q_start + rows) of head h: scaled q, dout, lse and delta into the workspace.
  auto load_queries = [&](Workspace<acc_t>& ws, int64_t b, int64_t h, int64_t q_start, int64_t rows) {
    const int64_t token = p.cu_q[b] + q_start;
    load_rows(q_rows, token, h, rows, d, scale, ws.q.data(), ws.dp);
    load_rows(dout_rows, token, h, rows, d, acc_t(1), ws.dout.data(), ws.dp);
    for (int64_t i = 0; i < rows; ++i) {
      ws.lse[i] = lse_data[h * lse_head_stride + (token + i) * lse_token_stride];
      ws.delta[i] = delta[h * total_q + token + i];
    }
  };

  // Fused single pass: one item per (sequence, kv head) computes dQ, dK and dV of the sequence for that kv head
  // and its query heads, so P and dP are computed once per tile. dQ accumulates over the key blocks (in order:
  // deterministic) in the thread's whole-sequence buffer. Used unless one item would dominate a thread's share
  // (e.g. one long sequence with few kv heads), where the two-pass split below parallelises better.
  const auto sequence_items = make_items(
      p.batch(), p.heads_k, std::numeric_limits<int32_t>::max(), [&](int64_t b) { return std::max<int64_t>(p.len_k(b), 1); },
      [&](int64_t b, int64_t, int64_t) {
        int64_t cost = 0;
        for (int64_t key = 0; key < p.len_k(b); key += kBlockK) {
          cost += std::min<int64_t>(kBlockK, p.len_k(b) - key) * p.group * (p.len_q(b) - p.first_query(b, key));
        }
        return cost;
      });
  // threads the two-pass split could keep busy (its items are small)
  const int64_t split_threads =
      threads_for(sequence_items, d, at::get_num_threads());
  if (heaviest_cost(sequence_items) * split_threads <= total_cost(sequence_items)) {
    const HeadRows<const scalar_t> k_src(k), v_src(v);
    run_items<FusedWorkspace<acc_t>>(sequence_items, d, [&](const WorkItem& item, FusedWorkspace<acc_t>& ws) {
      const int64_t b = item.seq, kv_head = item.head, len_q = p.len_q(b), dp = ws.dp;
      ws.reserve_queries(p.group * len_q);
      for (int64_t g = 0; g < p.group; ++g) {  // query head kv_head * group + g owns rows [g * len_q, ...)
        const int64_t h = kv_head * p.group + g, token = p.cu_q[b];
        load_rows(q_rows, token, h, len_q, d, scale, ws.q.data() + g * len_q * dp, dp);
        load_rows(dout_rows, token, h, len_q, d, acc_t(1), ws.dout.data() + g * len_q * dp, dp);
        for (int64_t i = 0; i < len_q; ++i) {
          ws.lse[g * len_q + i] = lse_data[h * lse_head_stride + (token + i) * lse_token_stride];
          ws.delta[g * len_q + i] = delta[h * total_q + token + i];
        }
      }
      std::fill(ws.dq.begin(), ws.dq.begin() + p.group * len_q * dp, acc_t(0));
      for (int64_t key = 0; key < p.len_k(b); key += kBlockK) {
        const int64_t cols = std::min<int64_t>(kBlockK, p.len_k(b) - key), k_token = p.cu_k[b] + key;
        // short sequences (every tile of at most kRowDotRows rows) take their scores from key and value rows
        const bool row_dots = len_q <= kRowDotRows;
        load_rows(k_src, k_token, kv_head, cols, d, acc_t(1), ws.k_rows.data(), dp);
        if (row_dots) {
          load_rows(v_src, k_token, kv_head, cols, d, acc_t(1), ws.v_rows.data(), dp);
        } else {
          load_transposed(k_src, k_token, kv_head, cols, d, ws.kt.data());
          load_transposed(v_src, k_token, kv_head, cols, d, ws.vt.data());
        }
        std::fill(ws.dk.begin(), ws.dk.begin() + cols * dp, acc_t(0));
        std::fill(ws.dv.begin(), ws.dv.begin() + cols * dp, acc_t(0));
        const int64_t first_block = p.first_query(b, key) / kBlockQ * kBlockQ;
        for (int64_t g = 0; g < p.group; ++g) {
          for (int64_t q_start = first_block; q_start < len_q; q_start += kBlockQ) {
            const int64_t rows = std::min<int64_t>(kBlockQ, len_q - q_start), row0 = g * len_q + q_start;
            p.visible(b, q_start, rows, key, cols, ws.visible.data());
            if (row_dots) {
              tiles<acc_t>().backward_fused_rows(ws.q.data() + row0 * dp, ws.dout.data() + row0 * dp, rows, dp,
                                                       ws.k_rows.data(), ws.v_rows.data(), cols, ws.visible.data(),
                                                       ws.lse.data() + row0, ws.delta.data() + row0, ws.s.data(),
                                                       ws.ds.data(), ws.dq.data() + row0 * dp, ws.dk.data(),
                                                       ws.dv.data());
              continue;
            }
            tiles<acc_t>().backward_fused(ws.q.data() + row0 * dp, ws.dout.data() + row0 * dp, rows, d, dp,
                                                ws.kt.data(), ws.vt.data(), ws.k_rows.data(), cols,
                                                ws.visible.data(), ws.lse.data() + row0, ws.delta.data() + row0,
                                                ws.s.data(), ws.ds.data(), ws.dq.data() + row0 * dp,
                                                ws.dk.data(), ws.dv.data());
          }
        }
        store_rows(ws.dk.data(), dp, cols, d, acc_t(1), dk_rows, k_token, kv_head);
        store_rows(ws.dv.data(), dp, cols, d, acc_t(1), dv_rows, k_token, kv_head);
      }
      for (int64_t g = 0; g < p.group; ++g) {
        store_rows(ws.dq.data() + g * len_q * dp, dp, len_q, d, scale, dq_rows, p.cu_q[b], kv_head * p.group + g);
      }
    });
    return;
  }

  // Two passes. dK, dV: one item per (sequence, kv head, key block); ws.acc holds dK, ws.acc2 dV.
  const KeyTiles<scalar_t> keys(p, k, v, /*backward=*/true);
  const auto key_items = make_items(
      p.batch(), p.heads_k, kBlockK, [&](int64_t b) { return p.len_k(b); },
      [&](int64_t b, int64_t start, int64_t cols) { return cols * p.group * (p.len_q(b) - p.first_query(b, start)); });
  run_items<Workspace<acc_t>>(key_items, d, [&](const WorkItem& item, Workspace<acc_t>& ws) {
    const int64_t b = item.seq, kv_head = item.head, key = int64_t(item.block) * kBlockK;
    const int64_t cols = std::min<int64_t>(kBlockK, p.len_k(b) - key), k_token = p.cu_k[b] + key;
    const int64_t tile = keys.tile(b, kv_head, key);
    std::fill(ws.acc.begin(), ws.acc.begin() + cols * ws.dp, acc_t(0));
    std::fill(ws.acc2.begin(), ws.acc2.begin() + cols * ws.dp, acc_t(0));
    const int64_t first_block = p.first_query(b, key) / kBlockQ * kBlockQ;
    for (int64_t h = kv_head * p.group; h < (kv_head + 1) * p.group; ++h) {
      for (int64_t q_start = first_block; q_start < p.len_q(b); q_start += kBlockQ) {
        const int64_t rows = std::min<int64_t>(kBlockQ, p.len_q(b) - q_start);
        load_queries(ws, b, h, q_start, rows);
        p.visible(b, q_start, rows, key, cols, ws.visible.data());
        tiles<acc_t>().backward_key(ws.q.data(), ws.dout.data(), rows, d, ws.dp, keys.transposed_k(tile),
                                          keys.transposed_v(tile), cols, ws.visible.data(), ws.lse.data(),
                                          ws.delta.data(), ws.s.data(), ws.ds.data(), ws.acc.data(),
                                          ws.acc2.data());
      }
    }
    store_rows(ws.acc.data(), ws.dp, cols, d, acc_t(1), dk_rows, k_token, kv_head);
    store_rows(ws.acc2.data(), ws.dp, cols, d, acc_t(1), dv_rows, k_token, kv_head);
  });

  // dQ: one item per (sequence, query head, query block); ws.acc holds dQ / scale.
  const auto query_items = make_items(
      p.batch(), p.heads_q, kBlockQ, [&](int64_t b) { return p.len_q(b); },
      [&](int64_t b, int64_t start, int64_t rows) { return rows * p.key_end(b, start + rows); });
  run_items<Workspace<acc_t>>(query_items, d, [&](const WorkItem& item, Workspace<acc_t>& ws) {
    const int64_t b = item.seq, h = item.head, q_start = int64_t(item.block) * kBlockQ;
    const int64_t rows = std::min<int64_t>(kBlockQ, p.len_q(b) - q_start), kv_head = h / p.group;
    load_queries(ws, b, h, q_start, rows);
    std::fill(ws.acc.begin(), ws.acc.begin() + rows * ws.dp, acc_t(0));
    const int64_t key_end = p.key_end(b, q_start + rows);
    for (int64_t key = 0; key < key_end; key += kBlockK) {
      const int64_t cols = std::min<int64_t>(kBlockK, key_end - key), tile = keys.tile(b, kv_head, key);
      p.visible(b, q_start, rows, key, cols, ws.visible.data());
      tiles<acc_t>().backward_query(ws.q.data(), ws.dout.data(), rows, d, ws.dp, keys.transposed_k(tile),
                                          keys.transposed_v(tile), keys.rows_k(tile), cols, ws.visible.data(),
                                          ws.lse.data(), ws.delta.data(), ws.s.data(), ws.ds.data(),
                                          ws.acc.data());
    }
    store_rows(ws.acc.data(), ws.dp, rows, d, scale, dq_rows, p.cu_q[b] + q_start, h);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal) {
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, "max_seqlen_q and max_seqlen_k must be non-negative");
  const Problem p = make_problem(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal);
  check_heads_tensor(dout_in, "dout");
  check_heads_tensor(out_in, "out");
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "dout and out must have q's shape ", q_in.sizes(), ", got ", dout_in.sizes(), " and ", out_in.sizes());
  TORCH_CHECK(dout_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
              "dout and out must have q's dtype ", q_in.scalar_type());
  const auto lse_dtype = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q_in.size(1) && lse.size(1) == q_in.size(0) &&
                  lse.device().is_cpu() && lse.scalar_type() == lse_dtype,
              "lse must be a CPU ", lse_dtype, " tensor of shape [", q_in.size(1), ", ", q_in.size(0), "], got ",
              lse.scalar_type(), " ", lse.sizes());
  const at::Tensor dout = with_contiguous_head_dim(dout_in), q = with_contiguous_head_dim(q_in),
                   k = with_contiguous_head_dim(k_in), v = with_contiguous_head_dim(v_in),
                   out = with_contiguous_head_dim(out_in);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attention_backward_cpu",
                                  [&] { backward_kernel<scalar_t>(p, dout, q, k, v, out, lse, dq, dk, dv); });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace dpar

TORCH_LIBRARY_FRAGMENT(dpar_C, m) {
  m.def(
      "varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float softmax_scale, bool causal) -> (Tensor, Tensor)");
  m.def(
      "varlen_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, "
      "bool causal) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dpar_C, CPU, m) {
  m.impl("varlen_attention", &dpar::varlen_attention_cpu);
  m.impl("varlen_attention_backward", &dpar::varlen_attention_backward_cpu);
}
