// Hopper (sm_90a) logits GEMMs with the row math in the epilogue: x[rows, D] W[cols, D]^T is
// computed by a CUTLASS warp-specialized TMA + WGMMA mainloop, and each CTA tile of fp32
// accumulators goes straight from registers into
//   - StatsMath: the online-softmax statistics (RowState) of each row over the tile's columns
//     (the forward: nothing of size rows x cols is written), or
//   - GradMath: dZ of the tile from each row's known LSE (the recompute backward: dZ is written
//     once, in the input dtype, instead of fp32 logits written, read back and rewritten).
// The per-element and per-row formulas are those of core/row_math.h, as in the row kernels.
//
// Included by the sm90_fused_logits_*.cu files only: each instantiates one Math for bf16 and fp16,
// in both kernel shapes (run_fused_logits picks one by the hidden size).
#pragma once

#ifndef NDEBUG
#error "sm90_fused_logits.cuh needs NDEBUG (see sm90_fused_logits_stats.cu)"
#endif

#include <cuda.h>  // CUtensorMap (the driver is reached through the runtime's entry points)
#include <cutlass/arch/barrier.h>
#include <cutlass/cutlass.h>
#include <cutlass/device_kernel.h>

#include <cstdlib>
#include <cute/arch/copy_sm90.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/cluster_launch.hpp>
#include <cutlass/cuda_host_adapter.hpp>
#include <cutlass/epilogue/collective/detail.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <mutex>
#include <type_traits>

#include "core/backend.h"
#include "core/row_math.h"
#include "cuda/common.cuh"
#include "cuda/fused_logits.h"
#include "cuda/row_grad.cuh"

namespace flce::detail::cuda::sm90 {

// The kernel's shape: CTA tile (rows, columns, K step), cluster, and mainloop schedule. Two are
// built, both in clusters of two CTAs along the rows that share each W tile through TMA multicast,
// both with tiles of kFusedTileCols columns (a statistics kernel writes one partial RowState per
// tile):
//   - cooperative: one CTA tile of 128 rows (two consumer warpgroups of 64) x 256 columns, K steps
//     of 64; the epilogue runs while the tensor cores wait. Measured on an H100 against 1x1 and
//     1x2 clusters and 64 x 256 ping-pong tiles on whole benchmark shapes: the best or within 2%
//     where D >= 2304.
//   - ping-pong: each consumer warpgroup a tile of 64 x 256, the two taking turns, so that one
//     warpgroup's epilogue runs while the other's mainloop keeps the tensor cores busy. It pays
//     where the epilogue weighs most against the mainloop, at small D (kFusedPingpongMaxHidden).
// The ping-pong kernels stage their 16-bit output tiles in shared memory for the TMA unit
// (StagedTileStore); the cooperative ones store from registers.
// Measured on an H200 (bf16, interleaved runs; bench/NOTES.md, version 8): at D = 896 (qwen-0.5b)
// ping-pong took the lean plan's dZ kernels from 9.3 to 8.1 ms in total, the lean fwd+bwd from
// 33.6 to 32.6 ms, grad-in-forward from 27.2 to 26.1 ms and the forward alone from 8.1 to 7.1 ms.
// At D = 2304 and 4096 the dZ kernels also ran 12-16% faster, but the whole calls did not
// (gemma2, llama3 and llama3-4k within +-1.5%), and the forward alone ran 5% slower at gemma2 and
// llama3.
template <class TileShape_, class ClusterShape_, class Schedule_>
struct FusedConfig {
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;
  using Schedule = Schedule_;
};
using CooperativeConfig = FusedConfig<cute::Shape<cute::_128, cute::_256, cute::_64>,
                                      cute::Shape<cute::_2, cute::_1, cute::_1>,
                                      cutlass::gemm::KernelTmaWarpSpecializedCooperative>;
using PingpongConfig = FusedConfig<cute::Shape<cute::_64, cute::_256, cute::_64>,
                                   cute::Shape<cute::_2, cute::_1, cute::_1>,
                                   cutlass::gemm::KernelTmaWarpSpecializedPingpong>;
static_assert(cute::size<0>(CooperativeConfig::TileShape{}) == kFusedTileRows &&
                  cute::size<1>(CooperativeConfig::TileShape{}) == kFusedTileCols &&
                  cute::size<1>(PingpongConfig::TileShape{}) == kFusedTileCols,
              "fused_logits.h states the tiles");

// A warpgroup MMA accumulator fragment is ((2, 2, N/8), MMA_M, MMA_N): value mode 0 steps to the
// next column, mode 1 to the row 8 below, mode 2 to the columns 8 to the right. Viewed as
// (rows, cols) of this thread: ((2, MMA_M), (2, N/8, MMA_N)). The four threads of a quad hold
// the same rows, so a row reduction is in-thread, then two shuffles.
template <class Layout>
CUTE_HOST_DEVICE auto accumulator_rows_cols(Layout l) {
  using namespace cute;
  static_assert(decltype(rank<0>(l))::value == 3, "expects a warpgroup MMA accumulator layout");
  static_assert(decltype(size<0, 0>(l))::value == 2 && decltype(size<0, 1>(l))::value == 2,
                "expects pairs of columns and of rows in the MMA value mode");
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                     make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// Merges the RowState of the four threads of each quad; every lane ends with the quad's state.
__device__ __forceinline__ void quad_merge(RowState& s) {
  s.merge(shfl_xor_state(s, 1));
  s.merge(shfl_xor_state(s, 2));
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(kFullMask, v, 1));
  return fmaxf(v, __shfl_xor_sync(kFullMask, v, 2));
}

// Code size decides the speed of these epilogues: every loop over a thread's accumulators is
// unrolled (registers cannot be indexed at run time), so each per-element instruction is repeated
// 128 times per tile. An epilogue that tested every option per element was measured at tens of
// thousands of instructions and 3.7x the GEMM's time (instruction-cache misses stall the
// mainloop too). So the fused GEMMs serve the options that cost a few instructions per element:
// logit scale, z-loss, unweighted label smoothing, ignore_index, any reduction. Bias,
// soft-capping, metrics and class-weighted smoothing take the GEMM + row kernel path
// (fused_stats_supported / fused_grad_supported in fused_logits.cpp).

// True when the whole CTA tile lies inside the launch's columns (no per-column test needed).
__device__ __forceinline__ bool full_tile(int n_tile, int cols) {
  return (static_cast<int64_t>(n_tile) + 1) * kFusedTileCols <= cols;
}

// Transposes 4 x 4 32-bit words across the four threads of a quad: afterwards thread q holds in
// w[s] what thread s held in w[q]. Two butterfly rounds of two shuffles each (every lane of the
// warp must call it).
__device__ __forceinline__ void quad_transpose(uint32_t (&w)[4], int q) {
  CUTLASS_PRAGMA_UNROLL
  for (int bit = 1; bit <= 2; bit <<= 1) {
    // The slot pairs (lo, lo + bit) that differ in this bit: (0, 1), (2, 3), then (0, 2), (1, 3).
    // Each thread sends the slot on its partner's side of the bit and stores what it receives in
    // the slot on its own side.
    const int lo0 = 0, lo1 = bit == 1 ? 2 : 1;
    const bool high = (q & bit) != 0;
    uint32_t v0 = high ? w[lo0] : w[lo0 + bit];
    uint32_t v1 = high ? w[lo1] : w[lo1 + bit];
    v0 = __shfl_xor_sync(kFullMask, v0, bit);
    v1 = __shfl_xor_sync(kFullMask, v1, bit);
    if (high) {
      w[lo0] = v0;
      w[lo1] = v1;
    } else {
      w[lo0 + bit] = v0;
      w[lo1 + bit] = v1;
    }
  }
}

// Stores a thread's values of row r of the tile (one per accumulator column, in accumulator
// order) as 16-bit T into the row that starts at `out` (16-byte aligned, a pitch of a multiple of
// 8), columns < cols only. A thread's accumulators of a row come in column pairs (2j + {0, 1} of
// its columns, 8 apart per j), four threads to a quad; a quad transpose turns each group of four
// pairs into one 16-byte store of 8 adjacent columns per thread, instead of four 4-byte stores.
// Every lane of the warp must call it (the shuffles); row_ok false only skips the stores.
template <class T, int kCols, class Crd>
__device__ __forceinline__ void store_row_16bit(T* out, const float (&v)[kCols], const Crd& crd,
                                                int r, int cols, bool row_ok) {
  using namespace cute;
  static_assert(sizeof(T) == 2, "16-bit values: two columns per 32-bit word");
  static_assert(kCols % 8 == 0, "columns come in groups of four pairs");
  const int q = threadIdx.x % 4;
  CUTLASS_PRAGMA_UNROLL
  for (int c0 = 0; c0 < kCols; c0 += 8) {
    uint32_t w[4];
    CUTLASS_PRAGMA_UNROLL
    for (int s = 0; s < 4; ++s) w[s] = Word<T>::pack(&v[c0 + 2 * s]);  // columns n, n + 1
    quad_transpose(w, q);
    // This group spans 32 columns from (its first column rounded down to 8); thread q now holds
    // the 8 columns from 8 q on, in w[0..3].
    const int n0 = (get<1>(crd(r, c0)) & ~7) + 8 * q;
    if (!row_ok) continue;
    if (n0 + 8 <= cols) {
      *reinterpret_cast<uint4*>(out + n0) = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
      CUTLASS_PRAGMA_UNROLL
      for (int s = 0; s < 4; ++s) {
        float pair[2];
        Word<T>::unpack(w[s], pair);
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < 2; ++i) {
          if (n0 + 2 * s + i < cols) out[n0 + 2 * s + i] = from_float<T>(pair[i]);
        }
      }
    }
  }
}

// Where a fused epilogue's 16-bit tile goes: Math::apply hands each thread's values of one
// accumulator row to row().
//   - DirectTileStore (cooperative kernels): from registers to global memory (store_row_16bit),
//     masked at the edges.
//   - StagedTileStore (ping-pong kernels): into a shared-memory copy of the warpgroup's 64 x 256
//     tile, which one thread hands to the TMA unit once every row is in (finish()), so that the
//     global writes run while the warpgroups compute. Measured on an H200 at qwen-0.5b (D = 896,
//     bench/NOTES.md, version 14): the statistics GEMM that stores the terms took 8.6 ms per call
//     with direct stores and 6.7 ms with no stores at all; staged, the fused GEMMs of a
//     grad-in-forward call took 7.8 ms against 9.1 ms direct (same run, same bits), the call 22.8
//     against 23.9 ms. The buffer costs the mainloop one of its five stages. The cooperative
//     kernels keep direct stores: their two warpgroups' epilogues run at once and would need
//     64 KB, two of their four stages (version 7 measured a staged cooperative epilogue slower).
template <class T>
struct DirectTileStore {
  T* out;  // the launch's element (0, 0)
  int64_t ld;
  int rows, cols;

  template <int kCols, class Crd>
  __device__ void row(const float (&v)[kCols], const Crd& crd, int r, int m) const {
    const bool row_ok = m < rows;
    store_row_16bit(out + static_cast<int64_t>(row_ok ? m : 0) * ld, v, crd, r, cols, row_ok);
  }
};

// The staged tile: a warpgroup's 64 rows x 256 columns of 16-bit values, as four boxes of 64 x 64
// (128-byte rows, the widest box the 128-byte swizzle takes), each 1024-byte aligned.
constexpr int kStagedRows = 64;
constexpr int kStagedBoxCols = 64;
constexpr int kStagedBoxBytes = kStagedRows * kStagedBoxCols * 2;
constexpr int kStagedTileBytes = kStagedBoxBytes * (kFusedTileCols / kStagedBoxCols);

// The TMA descriptor of a [rows, cols] 16-bit output with row pitch ld (16-byte aligned base, ld a
// multiple of 8): boxes of kStagedRows x kStagedBoxCols under the 128-byte swizzle. Only the bytes
// move, so every 16-bit type is copied as uint16. The TMA unit clips each box to rows x cols.
inline bool encode_staged_store(CUtensorMap* map, void* base, int64_t rows, int64_t cols,
                                int64_t ld) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t pitch[1] = {static_cast<cuuint64_t>(ld) * 2};
  const cuuint32_t box[2] = {kStagedBoxCols, kStagedRows};
  const cuuint32_t element_strides[2] = {1, 1};
  return CUTLASS_CUDA_DRIVER_WRAPPER_CALL(cuTensorMapEncodeTiled)(
             map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, base, dims, pitch, box, element_strides,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <class T>
struct StagedTileStore {
  uint8_t* smem;  // kStagedTileBytes, 1024-byte aligned
  const CUtensorMap* map;

  // A warpgroup MMA accumulator row r of this thread is row 16 w + 8 r + lane / 4 of the tile (w:
  // the warp in the warpgroup), its columns 8 j + 2 (lane % 4) + {0, 1} for j < 32: the fragments
  // of 8 x 8 matrices that stmatrix stores, four per instruction, with lane l giving the address of
  // row l % 8 of matrix l / 8. Under the 128-byte swizzle, the 16-byte chunk j % 8 of a box row
  // sits at chunk (j % 8) ^ (row % 8): the eight rows of a matrix hit eight different banks.
  template <int kCols, class Crd>
  __device__ void row(const float (&v)[kCols], const Crd&, int r, int) const {
    static_assert(kCols == 2 * kFusedTileCols / 8,
                  "a 64 x 256 warpgroup tile: 64 columns a thread");
    const int lane = threadIdx.x % 32;
    const int box_row = 16 * ((threadIdx.x / 32) % 4) + 8 * r + lane % 8;
    CUTLASS_PRAGMA_UNROLL
    for (int j0 = 0; j0 < kCols / 2; j0 += 4) {
      uint32_t w[4];
      CUTLASS_PRAGMA_UNROLL
      for (int s = 0; s < 4; ++s) w[s] = Word<T>::pack(&v[2 * (j0 + s)]);
      const int j = j0 + lane / 8;  // the 8-column block of this lane's address
      uint8_t* p = smem + (j / 8) * kStagedBoxBytes + box_row * 128 + (((j % 8) ^ (lane % 8)) << 4);
      cute::SM90_U32x4_STSM_N::copy(w[0], w[1], w[2], w[3], *reinterpret_cast<cute::uint128_t*>(p));
    }
  }

  // After every thread's rows: the shared-memory writes are made visible to the TMA unit, one
  // thread issues the four box copies, and it waits until they have read the shared memory before
  // the warpgroup lets the other one's epilogue (which reuses the buffer) start. The global writes
  // finish on their own.
  __device__ void finish(int m_tile, int n_tile, int thread_idx) const {
    cutlass::arch::fence_view_async_shared();
    // One barrier per consumer warpgroup (their epilogues take turns, but need not share one).
    cutlass::arch::NamedBarrier::sync(128, threadIdx.x / 128);
    if (thread_idx == 0) {
      CUTLASS_PRAGMA_UNROLL
      for (int b = 0; b < kFusedTileCols / kStagedBoxCols; ++b) {
        cute::SM90_TMA_STORE_2D::copy(
            map, smem + b * kStagedBoxBytes,
            n_tile * static_cast<int>(kFusedTileCols) + b * kStagedBoxCols, m_tile * kStagedRows);
      }
      cute::tma_store_arrive();
      cute::tma_store_wait<0>();
    }
  }
};

// Math without a tile to store (the forward's statistics).
struct NoTileStore {
  template <int kCols, class Crd>
  __device__ void row(const float (&)[kCols], const Crd&, int, int) const {}
};

// Forward: the RowState of every row over the tile's columns, and the label's logit of the rows
// whose label falls in the tile. The label's logit must come from these accumulators: the loss is
// lse - z_label, and the GEMM's rounding of the dominant logit cancels between the two terms only
// when both see the same value (a separate fp32 dot product for z_label was measured 1.8e-5 off
// in relative loss at the benchmark shapes, against 7e-9 for consistent values).
// kStoreExp (grad-in-forward): also stores each element's e = exp(z - m), m the row's max over
// the tile, in fp16 at a.tile_exp (the terms of the sum, so one exp2 serves both); the row kernel
// turns them into dZ once the row's LSE is known. fp16, not bf16: e lies in [0, 1], where fp16
// carries 3 more bits, and dZ's accuracy rests on them. With a.row_shift (Plan::shifted_terms) a
// tile's terms are exp(z - s) under its row's shift s instead, where they fit fp16; those are
// instantiated with TermT the input dtype, so that the dx GEMM reads them with W as it is (an fp16
// copy of a bf16 W would cost V * D * 2 bytes).
template <bool kStoreExp, class TermT = __half>
struct StatsMath {
  using Args = RowForwardArgs;
  using Out = TermT;
  static constexpr bool kPartialPerTile = true;
  static constexpr bool kStoresTile = kStoreExp;
  CUTLASS_HOST_DEVICE static void* output(const Args& a) { return a.tile_exp; }
  CUTLASS_HOST_DEVICE static int64_t output_ld(const Args& a) { return a.tile_exp_ld; }

  template <class Acc, class Crd, class Store>
  __device__ static void apply(const Args& a, const Acc& acc, const Crd& crd, int rows, int cols,
                               int n_tile, const Store& store) {
    using namespace cute;
    const LossOptions& o = a.options;
    const bool full = full_tile(n_tile, cols);
    const bool smoothing = o.label_smoothing > 0.0f;
    constexpr int kCols = decltype(size<1>(acc))::value;
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < size<0>(acc); ++r) {
      const int m = get<0>(crd(r, 0));
      // z in place of the accumulators (which die here); columns past the launch's end become
      // -inf, which the max ignores and the exponential turns into 0.
      float z[kCols];
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; ++c) z[c] = transform_logit(acc(r, c), o.logit_scale, 0.0f);
      if (!full) {
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < kCols; ++c) {
          if (get<1>(crd(r, c)) >= cols) z[c] = -INFINITY;
        }
      }
      float mx = -INFINITY;
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; ++c) mx = fmaxf(mx, z[c]);
      // Every lane of the quad sums under the quad's max, so the merge adds without rescaling.
      RowState st;
      st.max = quad_max(mx);
      // The terms' shift: the tile's max, or with row-shifted terms the row's shift where the
      // tile's terms fit fp16 under it. The sum is taken under the same shift (one exponential
      // per element serves both) and rescaled to the max once per row; a sum that underflowed
      // belongs to a tile far below the row's shift, whose terms the LSE cannot see.
      float shift = st.max;
      if (kStoreExp && a.row_shift != nullptr && m < rows) {
        const float s = a.row_shift[m];
        if (tile_takes_row_shift(st.max, s)) shift = s;
      }
      const ScaledSoftmaxExp exp_shifted = ScaledSoftmaxExp::of(1.0f, shift);  // exp(z - shift)
      float e[kStoreExp ? kCols : 1];
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; ++c) {
        const float ec = exp_shifted(z[c]);
        st.sum_exp += ec;
        if constexpr (kStoreExp) e[c] = ec;
      }
      if (kStoreExp && shift != st.max) {
        st.sum_exp = st.sum_exp > 0.0f ? st.sum_exp * softmax_exp(shift - st.max) : 0.0f;
      }
      if (smoothing) {  // unweighted: the sum of z over the valid columns
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < kCols; ++c) {
          if (full || get<1>(crd(r, c)) < cols) st.sum_wz += z[c];
        }
      }
      // A row's label lies in a given tile rarely (1 / tiles per row), so the per-element test
      // runs only when it does for some row of the warp.
      const int64_t tile_col0 = static_cast<int64_t>(n_tile) * kFusedTileCols;
      const int64_t label =
          m < rows ? load_label(a.labels, a.label_type, a.row_offset + m) - a.col_offset : -1;
      const bool label_here =
          label >= tile_col0 && label < tile_col0 + kFusedTileCols && label < cols;
      if (__any_sync(kFullMask, label_here)) {
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < kCols; ++c) {
          if (label_here && get<1>(crd(r, c)) == label) a.target_z[m] = z[c];
        }
      }
      quad_merge(st);
      if (m < rows && (threadIdx.x % 4) == 0) a.partials[m * a.partials_ld + n_tile] = st;
      if constexpr (kStoreExp) store.row(e, crd, r, m);
    }
  }
};

// Recompute backward: dZ of the tile, written in the input dtype (T). Without soft-cap, bias or
// class weights, a row's dZ is affine in p = exp(z - lse) (AffineLogitGrad), so an element costs a
// fused multiply-add, an exp2 and another fused multiply-add; the label's step is applied only in
// warps that hold some row's label (1 tile in cols / 256 per row). The host checks that ldz is a
// multiple of 8 and dz 16-byte aligned (store_row_16bit).
template <class T>
struct GradMath {
  using Args = RowGradArgs;
  using Out = T;
  static constexpr bool kPartialPerTile = false;
  static constexpr bool kStoresTile = true;
  static_assert(sizeof(T) == 2, "16-bit dZ: two columns per 32-bit word");
  CUTLASS_HOST_DEVICE static void* output(const Args& a) { return a.dz; }
  CUTLASS_HOST_DEVICE static int64_t output_ld(const Args& a) { return a.ldz; }

  template <class Acc, class Crd, class Store>
  __device__ static void apply(const Args& a, const Acc& acc, const Crd& crd, int rows, int, int,
                               const Store& store) {
    using namespace cute;
    const float scale = a.options.logit_scale;
    constexpr int kCols = decltype(size<1>(acc))::value;
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < size<0>(acc); ++r) {
      // The whole quad shares the row, and every lane takes part in the shuffles below, so a row
      // past the launch's end only skips its stores.
      const int m = get<0>(crd(r, 0));
      const bool row_ok = m < rows;
      RowGrad rg;  // zero coefficients for a row past the end
      if (row_ok) rg = row_grad_of(a, a.row_offset + m);
      // A row with zero coefficients (ignored, or past the end) takes p = 2^0 and a zero slope and
      // offset: zeros, with no test per element.
      const ScaledSoftmaxExp prob =
          rg.zero ? ScaledSoftmaxExp{} : ScaledSoftmaxExp::of(scale, rg.lse);
      const AffineLogitGrad grad = AffineLogitGrad::of(rg.k, scale);
      float g[kCols];
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < kCols; ++c) g[c] = grad(prob(acc(r, c)));
      // The label's column, in the launch's columns (-1 when the row has none); a thread's
      // columns lie between its first and its last.
      const int label = rg.label >= 0 ? static_cast<int>(rg.label - a.col_offset) : -1;
      const bool label_near = label >= get<1>(crd(r, 0)) && label <= get<1>(crd(r, kCols - 1));
      if (__any_sync(kFullMask, label_near)) {
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < kCols; ++c) {
          if (get<1>(crd(r, c)) == label) g[c] -= grad.target_step;
        }
      }
      store.row(g, crd, r, m);
    }
  }
};

// The collective epilogue: an operator-style epilogue (as CUTLASS's DefaultEpilogue) that hands
// the accumulators, viewed as rows and columns with their coordinates, to Math. kStaged: Math's
// 16-bit tile goes out through shared memory and the TMA unit (StagedTileStore; ping-pong only,
// where one warpgroup's tile is 64 x 256 and the two warpgroups' epilogues take turns).
template <class Element, class Math, bool kStaged>
class RowMathEpilogue {
 public:
  using ElementC = Element;  // no C operand is read
  using ElementD = Element;
  using StrideC = cute::Stride<int64_t, cute::_1, int64_t>;
  using StrideD = StrideC;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  struct StagedStorage {
    alignas(1024) uint8_t tile[kStagedTileBytes];
  };
  using SharedStorage = std::conditional_t<kStaged, StagedStorage, cute::tuple<>>;
  using Arguments = typename Math::Args;
  struct Params {
    Arguments args;
    CUtensorMap staged_map;  // kStaged: the output's TMA descriptor
    bool staged_map_ok;      // whether it could be encoded (launch_fused_logits checks)
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& shape, Arguments const& args, void*) {
    Params p{};
    p.args = args;
    p.staged_map_ok = true;
    if constexpr (kStaged) {
      p.staged_map_ok = encode_staged_store(&p.staged_map, Math::output(args), cute::get<0>(shape),
                                            cute::get<1>(shape), Math::output_ld(args));
    }
    return p;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*,
                                              cudaStream_t, cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const&) {
    return true;
  }

  CUTLASS_HOST_DEVICE explicit RowMathEpilogue(Params const& params,
                                               SharedStorage const& = SharedStorage())
      : params_(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
            class FrgLayout, class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char* smem) {
    using namespace cute;
    const int rows = get<0>(problem_shape_mnkl);
    const int cols = get<1>(problem_shape_mnkl);
    const int m_tile = get<0>(blk_coord_mnkl);
    const int n_tile = get<1>(blk_coord_mnkl);
    // (row, column) in the launch of every accumulator element of this thread.
    Tensor tile_coords = local_tile(make_identity_tensor(make_shape(rows, cols)),
                                    take<0, 2>(blk_shape_mnk), make_coord(m_tile, n_tile));
    Tensor thread_coords = tiled_mma.get_thread_slice(thread_idx).partition_C(tile_coords);
    Tensor acc = make_tensor(accumulators.data(), accumulator_rows_cols(accumulators.layout()));
    Tensor crd = make_tensor(thread_coords.data(), accumulator_rows_cols(thread_coords.layout()));
    using Out = typename Math::Out;
    if constexpr (!Math::kStoresTile) {
      Math::apply(params_.args, acc, crd, rows, cols, n_tile, NoTileStore{});
    } else if constexpr (kStaged) {
      static_assert(decltype(size<0>(blk_shape_mnk))::value == kStagedRows,
                    "staged stores serve 64-row warpgroup tiles");
      const StagedTileStore<Out> store{reinterpret_cast<uint8_t*>(smem), &params_.staged_map};
      Math::apply(params_.args, acc, crd, rows, cols, n_tile, store);
      store.finish(m_tile, n_tile, thread_idx);
    } else {
      const DirectTileStore<Out> store{static_cast<Out*>(Math::output(params_.args)),
                                       Math::output_ld(params_.args), rows, cols};
      Math::apply(params_.args, acc, crd, rows, cols, n_tile, store);
    }
  }

 private:
  // The kernel's own parameters (grid constants), never a copy: the TMA unit reads staged_map
  // where it is, which must not be local memory.
  Params const& params_;
};

template <class T>
struct CutlassElement;
template <>
struct CutlassElement<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct CutlassElement<__half> {
  using type = cutlass::half_t;
};

template <class Element, class Math, class Config>
struct FusedLogitsKernel {
  static constexpr bool kStaged =
      Math::kStoresTile &&
      std::is_same_v<typename Config::Schedule, cutlass::gemm::KernelTmaWarpSpecializedPingpong>;
  using Epilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
      RowMathEpilogue<Element, Math, kStaged>>;
  // x is [rows, D] row-major (A, K-major); W is [cols, D] row-major, i.e. B = W^T column-major.
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor, 8,
      Element, cutlass::layout::ColumnMajor, 8, float, typename Config::TileShape,
      typename Config::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::TensorStorage))>,
      typename Config::Schedule>::CollectiveOp;
  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue>;
};

// Launches the fused GEMM of `op` (T: the CUDA element type) with one kernel shape on `stream`.
template <class T, class Math, class Config>
Status launch_fused_logits(const LogitsOperands& op, const typename Math::Args& args,
                           cudaStream_t stream) {
  static_assert(
      !Math::kPartialPerTile || cute::size<1>(typename Config::TileShape{}) == kFusedTileCols,
      "a statistics kernel writes one partial RowState per kFusedTileCols columns");
  using Element = typename CutlassElement<T>::type;
  using Kernel = typename FusedLogitsKernel<Element, Math, Config>::Kernel;
  using Mainloop = typename FusedLogitsKernel<Element, Math, Config>::Mainloop;
  int device = 0;
  FLCE_CUDA_CHECK(cudaGetDevice(&device));
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = current_device_sms();
  typename Kernel::Arguments ka{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {static_cast<int>(op.rows), static_cast<int>(op.cols), static_cast<int>(op.hidden), 1},
      {static_cast<const Element*>(op.x), typename Mainloop::StrideA{op.ldx, cute::_1{}, 0},
       static_cast<const Element*>(op.weight), typename Mainloop::StrideB{op.ldw, cute::_1{}, 0}},
      args,
      hw};
  if (!Kernel::can_implement(ka)) {
    return Status::Error(StatusCode::kInvalidArgument,
                         "fused logits GEMM: CUTLASS cannot implement rows " +
                             std::to_string(op.rows) + ", cols " + std::to_string(op.cols) +
                             ", hidden " + std::to_string(op.hidden));
  }
  if (Kernel::get_workspace_size(ka) != 0) {
    return Status::Error(StatusCode::kBackendError, "fused logits GEMM: unexpected workspace");
  }
  const typename Kernel::Params params = Kernel::to_underlying_arguments(ka, nullptr);
  if (!params.epilogue.staged_map_ok) {
    return Status::Error(StatusCode::kBackendError,
                         "fused logits GEMM: the output's TMA descriptor could not be encoded");
  }
  constexpr int kSmem = Kernel::SharedStorageSize;
  // Per device (a host call, no synchronization).
  FLCE_CUDA_CHECK(cudaFuncSetAttribute(cutlass::device_kernel<Kernel>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  const dim3 grid = Kernel::get_grid_shape(params), block = Kernel::get_block_shape();
  using Cluster = typename Config::ClusterShape;
  if constexpr (cute::size(Cluster{}) == 1) {
    cutlass::device_kernel<Kernel><<<grid, block, kSmem, stream>>>(params);
  } else {
    const dim3 cluster(cute::size<0>(Cluster{}), cute::size<1>(Cluster{}),
                       cute::size<2>(Cluster{}));
    void* kernel_params[] = {const_cast<typename Kernel::Params*>(&params)};
    if (cutlass::ClusterLauncher::launch(
            grid, cluster, block, kSmem, stream,
            reinterpret_cast<const void*>(&cutlass::device_kernel<Kernel>),
            kernel_params) != cutlass::Status::kSuccess) {
      return Status::Error(StatusCode::kBackendError, "fused logits GEMM: cluster launch failed");
    }
  }
  FLCE_CUDA_CHECK_LAUNCH("fused logits GEMM");
  return Status::Ok();
}

// Launches the fused GEMM of `op` with the kernel shape for its hidden size. The caller has checked
// fused_logits_supported(op).
template <class T, class Math>
Status run_fused_logits(const LogitsOperands& op, const typename Math::Args& args,
                        cudaStream_t stream) {
  if (op.hidden < kFusedPingpongMaxHidden) {
    return launch_fused_logits<T, Math, PingpongConfig>(op, args, stream);
  }
  return launch_fused_logits<T, Math, CooperativeConfig>(op, args, stream);
}

}  // namespace flce::detail::cuda::sm90
