// Host-only checks of csrc/cuda/attention_tiles.h (built and run by tests/csrc/test_cuda_attention_host.py): the causal
// index math against a brute-force definition, the tile loops' coverage, and the shared-memory plans.
// Prints one line per failure and "all checks passed" on success.
#include <cstdio>
#include <initializer_list>

#include "cuda/attention_tiles.h"

using namespace dpar::attention;

static int failures = 0;

#define CHECK(cond, ...)                                  \
  do {                                                    \
    if (!(cond)) {                                        \
      if (++failures <= 20) {                             \
        std::printf("FAILED %s: ", #cond);                \
        std::printf(__VA_ARGS__);                         \
        std::printf("\n");                                \
      }                                                   \
    }                                                     \
  } while (0)

// The reference definition (naive.py): query j of Lq sees key i of Lk iff i <= Lk - Lq + j (causal) or always.
static bool reference_visible(int j, int i, int lq, int lk, bool causal) {
  return j < lq && i < lk && (!causal || i <= lk - lq + j);
}

static void check_visibility(int lq, int lk, bool causal) {
  for (int j = 0; j < lq; ++j) {
    for (int i = 0; i < lk; ++i) {
      CHECK(key_visible(j, i, lq, lk, causal) == reference_visible(j, i, lq, lk, causal), "lq=%d lk=%d j=%d i=%d", lq,
            lk, j, i);
    }
    if (j > 0) {
      CHECK(visible_key_end(j, lq, lk, causal) >= visible_key_end(j - 1, lq, lk, causal), "monotone lq=%d lk=%d", lq,
            lk);
    }
  }
  for (int i = 0; i < lk; ++i) {
    const int first = first_query_seeing(i, lq, lk, causal);
    for (int j = 0; j < lq; ++j) {
      CHECK(reference_visible(j, i, lq, lk, causal) == (j >= first), "first query lq=%d lk=%d i=%d j=%d", lq, lk, i,
            j);
    }
  }
}

// Forward / dQ loop: query block [q0, q0 + bm) visits key tiles k0 = 0, bn, ... < block_key_end. Every visible pair
// must lie in a visited tile, and every skipped tile must hold no visible pair.
static void check_query_block_loop(int lq, int lk, bool causal, int bm, int bn) {
  for (int q0 = 0; q0 < lq; q0 += bm) {
    const int key_end = block_key_end(q0, bm, lq, lk, causal);
    CHECK(key_end >= 0 && key_end <= lk, "key_end range lq=%d lk=%d q0=%d", lq, lk, q0);
    for (int k0 = 0; k0 < lk; k0 += bn) {
      const bool visited = k0 < key_end;
      bool any_visible = false;
      for (int j = q0; j < q0 + bm; ++j) {
        for (int i = k0; i < k0 + bn; ++i) any_visible |= reference_visible(j, i, lq, lk, causal);
      }
      CHECK(visited == any_visible, "q-block loop lq=%d lk=%d causal=%d q0=%d k0=%d bm=%d bn=%d", lq, lk, causal, q0,
            k0, bm, bn);
    }
  }
}

// dK/dV loop: key block [k0, k0 + bn) visits query blocks q0 = first_query_block_start(k0), ... < lq.
static void check_key_block_loop(int lq, int lk, bool causal, int bm, int bn) {
  for (int k0 = 0; k0 < lk; k0 += bn) {
    const int start = first_query_block_start(k0, bm, lq, lk, causal);
    CHECK(start % bm == 0 && start >= 0 && start <= lq, "start lq=%d lk=%d k0=%d", lq, lk, k0);
    for (int q0 = 0; q0 < lq; q0 += bm) {
      bool any_visible = false;
      for (int j = q0; j < q0 + bm; ++j) {
        for (int i = k0; i < k0 + bn; ++i) any_visible |= reference_visible(j, i, lq, lk, causal);
      }
      if (any_visible) CHECK(q0 >= start, "k-block loop skips a visible block lq=%d lk=%d k0=%d q0=%d", lq, lk, k0, q0);
      // With bottom-right causal masking, the first visited block always holds a visible pair.
      if (q0 == start) CHECK(any_visible, "k-block loop starts too early lq=%d lk=%d k0=%d q0=%d", lq, lk, k0, q0);
    }
  }
}

static void check_large_lengths() {
  const int big = 2000000000;
  CHECK(visible_key_end(big - 1, big, big, true) == big, "last query sees all keys");
  CHECK(visible_key_end(0, big, big, true) == 1, "first query sees one key");
  CHECK(visible_key_end(0, big, 1, true) == 0, "no key for early queries when Lq > Lk");
  CHECK(visible_key_end(0, 1, big, true) == big, "single query sees all keys");
  CHECK(first_query_seeing(big - 1, big, big, true) == big - 1, "last key");
  CHECK(first_query_block_start(big - 1, 64, big, big, true) == (big - 1) / 64 * 64, "last key block");
}

template <typename Plan>
static void check_plan_common(const char* name, int elem_bytes, int head_dim) {
  const int max_smem_sm80 = 163 * 1024;  // opt-in dynamic shared memory per block on sm_80 (sm_90 allows more)
  CHECK(Plan::kBytes <= max_smem_sm80, "%s elem=%d d=%d uses %d bytes", name, elem_bytes, head_dim, Plan::kBytes);
  CHECK(Plan::kBlockM % 16 == 0 && Plan::kBlockN % 32 == 0, "%s block sizes", name);
  CHECK(Plan::kLdS % 4 == 0, "%s float ld", name);
  if (elem_bytes == 2) CHECK(Plan::kLdQkv % 8 == 0 && Plan::kLdP % 8 == 0, "%s wmma ld elem=2 d=%d", name, head_dim);
}

template <int kElem, int kD, bool kShort = false>
static void check_plans() {
  using F = ForwardPlan<kElem, kD, kShort>;
  check_plan_common<F>("forward", kElem, kD);
  const int forward_offsets[] = {F::kQ, F::kK, F::kV, F::kS, F::kP, F::kO, F::kRowMax, F::kRowSum, F::kBytes};
  const int forward_sizes[] = {region_bytes(F::kBlockM, F::kLdQkv, kElem), region_bytes(F::kBlockN, F::kLdQkv, kElem),
                               region_bytes(F::kBlockN, F::kLdQkv, kElem), region_bytes(F::kBlockM, F::kLdS, 4),
                               region_bytes(F::kBlockM, F::kLdP, kElem),   region_bytes(F::kBlockM, F::kLdO, 4),
                               region_bytes(F::kBlockM, 1, 4),             region_bytes(F::kBlockM, 1, 4)};
  for (int r = 0; r < 8; ++r) {
    CHECK(forward_offsets[r] % kSmemAlign == 0, "forward region %d aligned elem=%d d=%d", r, kElem, kD);
    CHECK(forward_offsets[r] + forward_sizes[r] <= forward_offsets[r + 1], "forward region %d overlaps", r);
  }
  CHECK(F::kLdO % 4 == 0, "forward O ld");

  using B = BackwardPlan<kElem, kD, kShort>;
  check_plan_common<B>("backward", kElem, kD);
  const int backward_offsets[] = {B::kQ,  B::kDout, B::kK,    B::kV,   B::kS,     B::kDp, B::kP,
                                  B::kDs, B::kAcc0, B::kAcc1, B::kLse, B::kDelta, B::kBytes};
  const int backward_sizes[] = {region_bytes(B::kBlockM, B::kLdQkv, kElem), region_bytes(B::kBlockM, B::kLdQkv, kElem),
                                region_bytes(B::kBlockN, B::kLdQkv, kElem), region_bytes(B::kBlockN, B::kLdQkv, kElem),
                                region_bytes(B::kBlockM, B::kLdS, 4),       region_bytes(B::kBlockM, B::kLdS, 4),
                                region_bytes(B::kBlockM, B::kLdP, kElem),   region_bytes(B::kBlockM, B::kLdP, kElem),
                                region_bytes(B::kAccRows, B::kLdAcc, 4),    region_bytes(B::kAccRows, B::kLdAcc, 4),
                                region_bytes(B::kBlockM, 1, 4),             region_bytes(B::kBlockM, 1, 4)};
  for (int r = 0; r < 12; ++r) {
    CHECK(backward_offsets[r] % kSmemAlign == 0, "backward region %d aligned elem=%d d=%d", r, kElem, kD);
    CHECK(backward_offsets[r] + backward_sizes[r] <= backward_offsets[r + 1], "backward region %d overlaps", r);
  }
  CHECK(B::kLdAcc % 4 == 0, "backward acc ld");
}

template <int kElem>
static void check_plans_all_dims() {
  check_plans<kElem, 32>();
  check_plans<kElem, 64>();
  check_plans<kElem, 80>();
  check_plans<kElem, 96>();
  check_plans<kElem, 128>();
  check_plans<kElem, 32, true>();
  check_plans<kElem, 64, true>();
  check_plans<kElem, 80, true>();
  check_plans<kElem, 96, true>();
  check_plans<kElem, 128, true>();
}

int main() {
  const int block_sizes[][2] = {{32, 32}, {64, 64}, {16, 32}, {4, 8}, {8, 4}, {1, 1}};
  for (int causal = 0; causal < 2; ++causal) {
    for (int lq = 0; lq <= 40; ++lq) {
      for (int lk = 0; lk <= 40; ++lk) {
        check_visibility(lq, lk, causal);
        for (const auto& b : block_sizes) {
          check_query_block_loop(lq, lk, causal, b[0], b[1]);
          check_key_block_loop(lq, lk, causal, b[0], b[1]);
        }
      }
    }
    for (int lq : {1, 63, 64, 65, 130}) {
      for (int lk : {0, 1, 31, 64, 97, 200}) {
        check_query_block_loop(lq, lk, causal, 64, 64);
        check_query_block_loop(lq, lk, causal, 32, 32);
        check_key_block_loop(lq, lk, causal, 32, 32);
      }
    }
  }
  check_large_lengths();
  check_plans_all_dims<2>();
  check_plans_all_dims<4>();
  if (failures == 0) std::printf("all checks passed\n");
  return failures == 0 ? 0 : 1;
}
