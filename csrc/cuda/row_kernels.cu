// The row kernels: one thread block per row of a logits block.
//
// rows_forward: pass 1 walks the whole row once, each thread keeping an online-softmax RowState
// that the block merges; thread 0 then finishes the row (LSE, loss, metrics, gradient
// coefficients). Pass 2, when a gradient is wanted, walks the row again and writes dZ. A row split
// across vocabulary blocks (no gradient) leaves its merged state in a RowCarry for the next block.
// rows_grad: the LSE is known, so only the dZ pass runs.
//
// dZ may overwrite the logits in place with a narrower type (fp32 logits, 16-bit dZ with
// ldz = 2 * ld): dZ element c lands on bytes of fp32 element c / 2. The dZ pass therefore walks
// the row in tiles of blockDim.x * kElemsPerThread elements: every thread loads its elements of a
// tile into registers, the block synchronizes, then every thread writes its dZ of the tile. The
// writes of tile k touch only fp32 elements below (k + 1) * tile / 2, all read before that
// barrier, and never elements of tile k + 1, so one barrier per tile suffices.
#include <climits>

#include "core/row_math.h"
#include "cuda/common.cuh"
#include "cuda/fused_logits.h"
#include "cuda/launch.h"
#include "cuda/row_grad.cuh"

namespace flce::detail::cuda {
namespace {

// Elements each thread holds per tile: four 16-byte loads of fp32 or two of 16-bit logits, enough
// independent loads in flight per thread for a memory-bound walk (16 measured faster than 8 on an
// H100: bench/NOTES.md).
constexpr int kElemsPerThread = 16;
constexpr int kMaxRowThreads = 512;
constexpr int kMinRowThreads = 128;
// Two blocks of kMaxRowThreads per SM at most 64 registers per thread.
constexpr int kRowMinBlocksPerSm = 2;
static_assert(kMaxRowThreads % kWarpSize == 0 && kMaxRowThreads / kWarpSize <= kMaxWarps,
              "the block merge assumes whole warps and at most kMaxWarps of them");

// Threads per row block: enough that short rows are not spread over idle threads.
int row_threads(int64_t cols) {
  int64_t t = (cols + kElemsPerThread - 1) / kElemsPerThread;
  t = (t + kWarpSize - 1) / kWarpSize * kWarpSize;
  if (t < kMinRowThreads) t = kMinRowThreads;
  if (t > kMaxRowThreads) t = kMaxRowThreads;
  return static_cast<int>(t);
}

// RowState across the block ------------------------------------------------------------------

__device__ __forceinline__ void warp_merge(RowState& s) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) s.merge(shfl_xor_state(s, m));
}

// Merges every thread's state in a fixed order; the result is valid in thread 0.
__device__ __forceinline__ RowState block_merge(RowState s, RowState* smem) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  warp_merge(s);
  if (lane == 0) smem[warp] = s;
  __syncthreads();
  if (warp == 0) {
    RowState t;
    if (lane < static_cast<int>(blockDim.x / kWarpSize)) t = smem[lane];
    warp_merge(t);
    s = t;
  }
  return s;
}

// Finishes row `row` of a rows_forward call from its merged statistics (thread 0 of the row's
// block): loss, LSE and metrics (z_target: the transformed logit at the label), and the
// coefficients of its gradient.
__device__ __forceinline__ RowGrad finish_forward_row(const RowForwardArgs& a, int64_t row,
                                                      int64_t label, const RowState& st,
                                                      float z_target) {
  const LossOptions& o = a.options;
  const int64_t vocab = a.vocab_size;
  const float lse = st.lse();
  const bool valid = label_is_valid(label, o.ignore_index);
  const bool in_range = label_in_range(label, vocab);
  // An out-of-range label has no target logit or weight: NaN makes the row's loss (and its
  // gradient) NaN instead of silently wrong.
  const float w_target =
      in_range ? (a.class_weight != nullptr ? a.class_weight[label] : 1.0f) : NAN;
  const float weight_sum = a.scalars[kScalarWeightSum];
  a.row_loss[row] =
      valid ? row_loss(lse, z_target, w_target, st.sum_wz, weight_sum, vocab, o) : 0.0f;
  a.lse[row] = lse;
  if (a.row_metrics != nullptr) {
    float* m = a.row_metrics + row * kNumRowMetrics;
    m[kRowMaxLogit] = valid ? st.max : -INFINITY;
    m[kRowLogitNorm] = valid ? sqrtf(st.sum_z2) : 0.0f;
    m[kRowEntropy] = valid ? st.entropy() : 0.0f;
    m[kRowLseSquared] = valid ? lse * lse : 0.0f;
    m[kRowCorrect] = valid && st.argmax == label ? 1.0f : 0.0f;
  }
  RowGrad rg;
  if (a.dz != nullptr) {
    const float g = row_upstream(o.reduction, a.grad_loss, row, a.scalars[kScalarInvDenominator]);
    const float g_lse = a.grad_lse != nullptr ? a.grad_lse[row] : 0.0f;
    rg.k = grad_coefs(valid, g, g_lse, lse, w_target, weight_sum, vocab, o);
    rg.lse = lse;
    rg.label = valid && in_range ? label : -1;
    rg.zero = all_zero(rg.k);
  }
  return rg;
}

// Walking a row ------------------------------------------------------------------------------

// Column (within the block) of vector j of this thread in the tile starting at t0.
__device__ __forceinline__ int64_t vec_column(int64_t t0, int j, int vec) {
  return t0 + (static_cast<int64_t>(j) * blockDim.x + threadIdx.x) * vec;
}

// This thread's raw logits of one tile (bias added). Columns past `cols` read nothing.
// bias_col0: index into bias of column 0 of the block.
template <typename LogitT, int VEC>
__device__ __forceinline__ void load_tile(const LogitT* x, int64_t t0, int64_t cols,
                                          const void* bias, DType bias_type, int64_t bias_col0,
                                          float (&v)[kElemsPerThread]) {
#pragma unroll
  for (int j = 0; j < kElemsPerThread / VEC; ++j) {
    const int64_t c = vec_column(t0, j, VEC);
    float* out = v + j * VEC;
    if (c + VEC <= cols) {
      float part[VEC];
      load_vec<LogitT, VEC>(x + c, part);
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = part[i];
      if (bias != nullptr) {
        load_vec_dynamic<VEC>(bias, bias_type, bias_col0 + c, part);
#pragma unroll
        for (int i = 0; i < VEC; ++i) out[i] += part[i];
      }
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        out[i] = 0.0f;
        if (c + i < cols) {
          out[i] = to_float(x[c + i]);
          if (bias != nullptr) out[i] += load_dynamic(bias, bias_type, bias_col0 + c + i);
        }
      }
    }
  }
}

// Class weights of this thread's columns of a tile (1 without class weights).
template <int VEC>
__device__ __forceinline__ void load_class_weights(const float* cw, int64_t t0, int64_t cols,
                                                   int64_t cw_col0, float (&w)[kElemsPerThread]) {
#pragma unroll
  for (int j = 0; j < kElemsPerThread / VEC; ++j) {
    const int64_t c = vec_column(t0, j, VEC);
    float* out = w + j * VEC;
    if (cw == nullptr) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = 1.0f;
    } else if (c + VEC <= cols) {
      float part[VEC];
      load_vec<float, VEC>(cw + cw_col0 + c, part);
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = part[i];
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = c + i < cols ? cw[cw_col0 + c + i] : 0.0f;
    }
  }
}

template <typename DzT, int VEC>
__device__ __forceinline__ void store_tile(DzT* dz, int64_t t0, int64_t cols,
                                           const float (&g)[kElemsPerThread]) {
#pragma unroll
  for (int j = 0; j < kElemsPerThread / VEC; ++j) {
    const int64_t c = vec_column(t0, j, VEC);
    if (c + VEC <= cols) {
      float part[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) part[i] = g[j * VEC + i];
      store_vec<DzT, VEC>(dz + c, part);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        if (c + i < cols) dz[c + i] = from_float<DzT>(g[j * VEC + i]);
      }
    }
  }
}

// The dZ pass over one row of `cols` columns whose column 0 is global column col0. Called by all
// threads of the block (it synchronizes once per tile).
template <typename LogitT, typename DzT, int VEC>
__device__ __forceinline__ void write_row_grad(const LogitT* x, DzT* dz, int64_t cols, int64_t col0,
                                               const void* bias, DType bias_type, const float* cw,
                                               const LossOptions& o, const RowGrad& rg) {
  const int64_t tile = static_cast<int64_t>(blockDim.x) * kElemsPerThread;
  if (rg.zero) {
    // Nothing of the row is read, so in-place aliasing needs no ordering here.
    const float zeros[kElemsPerThread] = {};
    for (int64_t t0 = 0; t0 < cols; t0 += tile) store_tile<DzT, VEC>(dz, t0, cols, zeros);
    return;
  }
  // Class weights only enter the gradient through label smoothing.
  const float* weights = rg.k.coef_weight != 0.0f ? cw : nullptr;
  for (int64_t t0 = 0; t0 < cols; t0 += tile) {
    float v[kElemsPerThread];
    load_tile<LogitT, VEC>(x, t0, cols, bias, bias_type, col0, v);
    __syncthreads();  // every read of this tile precedes any in-place write of it
    float w[kElemsPerThread];
    load_class_weights<VEC>(weights, t0, cols, col0, w);
    float g[kElemsPerThread];
#pragma unroll
    for (int j = 0; j < kElemsPerThread / VEC; ++j) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const int e = j * VEC + i;
        const int64_t c = vec_column(t0, j, VEC) + i;
        const float z = transform_logit(v[e], o.logit_scale, o.softcap);
        g[e] = raw_logit_grad(rg.k, z, rg.lse, col0 + c == rg.label, w[e], o);
      }
    }
    store_tile<DzT, VEC>(dz, t0, cols, g);
  }
}

// Kernels ------------------------------------------------------------------------------------

template <typename LogitT, typename DzT, int VEC>
__global__ void __launch_bounds__(kMaxRowThreads, kRowMinBlocksPerSm)
    rows_forward_kernel(RowForwardArgs a) {
  __shared__ __align__(16) unsigned char merge_smem[sizeof(RowState) * kMaxWarps];
  __shared__ RowGrad row_grad;

  const int64_t r = blockIdx.x;
  const int64_t row = a.row_offset + r;
  const int64_t vocab = a.vocab_size;
  const int64_t cols = a.cols > 0 ? a.cols : vocab;
  const int64_t col0 = a.col_offset;
  const LogitT* x = static_cast<const LogitT*>(a.logits) + r * a.ld;
  const LossOptions& o = a.options;
  const int64_t tile = static_cast<int64_t>(blockDim.x) * kElemsPerThread;

  // Pass 1: online softmax statistics of the transformed logits.
  RowState st;
  for (int64_t t0 = 0; t0 < cols; t0 += tile) {
    float v[kElemsPerThread];
    load_tile<LogitT, VEC>(x, t0, cols, a.bias, a.bias_type, col0, v);
    float w[kElemsPerThread];
    load_class_weights<VEC>(a.class_weight, t0, cols, col0, w);
#pragma unroll
    for (int j = 0; j < kElemsPerThread / VEC; ++j) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const int64_t c = vec_column(t0, j, VEC) + i;
        if (c < cols) {
          st.add(transform_logit(v[j * VEC + i], o.logit_scale, o.softcap), w[j * VEC + i],
                 col0 + c);
        }
      }
    }
  }
  st = block_merge(st, reinterpret_cast<RowState*>(merge_smem));

  if (threadIdx.x == 0) {
    const int64_t label = load_label(a.labels, a.label_type, row);
    const bool label_here = label >= col0 && label < col0 + cols;
    // NaN for a label out of range: the row's loss (and gradient) is then NaN, never silently
    // wrong.
    float z_target = NAN;
    if (label_here) {
      float raw = to_float(x[label - col0]);
      if (a.bias != nullptr) raw += load_dynamic(a.bias, a.bias_type, label);
      z_target = transform_logit(raw, o.logit_scale, o.softcap);
    }
    const bool finish = a.carry == nullptr ||
                        carry_row_block(a.carry[row], col0, cols, vocab, label_here, st, z_target);
    if (finish) {
      const RowGrad rg = finish_forward_row(a, row, label, st, z_target);
      if (a.dz != nullptr) row_grad = rg;
    }
  }
  if (a.dz == nullptr) return;  // uniform across the block
  __syncthreads();
  const RowGrad rg = row_grad;
  DzT* dz = static_cast<DzT*>(a.dz) + r * a.ldz;
  write_row_grad<LogitT, DzT, VEC>(x, dz, vocab, 0, a.bias, a.bias_type, a.class_weight, o, rg);
}

// Rows of a block whose statistics a fused logits GEMM left as per-tile partial RowStates: merges
// them in a fixed order (deterministic), then finishes the row as rows_forward_kernel does.
constexpr int kPartialThreads = 128;

__global__ void __launch_bounds__(kPartialThreads) rows_from_partials_kernel(RowForwardArgs a) {
  __shared__ __align__(16) unsigned char merge_smem[sizeof(RowState) * kMaxWarps];
  const int64_t r = blockIdx.x;
  const int64_t row = a.row_offset + r;
  const int64_t vocab = a.vocab_size;
  const int64_t cols = a.cols > 0 ? a.cols : vocab;
  const int64_t col0 = a.col_offset;
  const int64_t tiles = (cols + kFusedTileCols - 1) / kFusedTileCols;
  const RowState* partials = a.partials + r * a.partials_ld;
  RowState st;
  for (int64_t t = threadIdx.x; t < tiles; t += blockDim.x) st.merge(partials[t]);
  st = block_merge(st, reinterpret_cast<RowState*>(merge_smem));
  if (threadIdx.x != 0) return;
  const int64_t label = load_label(a.labels, a.label_type, row);
  const bool label_here = label >= col0 && label < col0 + cols;
  float z_target = label_here ? a.target_z[r] : NAN;  // NaN: see rows_forward_kernel
  if (a.carry == nullptr ||
      carry_row_block(a.carry[row], col0, cols, vocab, label_here, st, z_target)) {
    finish_forward_row(a, row, label, st, z_target);
    if (a.row_max != nullptr) a.row_max[r] = st.max;
  }
}

template <typename DzT, int VEC>
__global__ void __launch_bounds__(kMaxRowThreads, kRowMinBlocksPerSm)
    rows_grad_kernel(RowGradArgs a) {
  __shared__ RowGrad row_grad;
  const int64_t r = blockIdx.x;
  const int64_t row = a.row_offset + r;
  const LossOptions& o = a.options;

  if (threadIdx.x == 0) row_grad = row_grad_of(a, row);
  __syncthreads();
  const RowGrad rg = row_grad;
  const float* x = a.logits + r * a.ld;
  DzT* dz = static_cast<DzT*>(a.dz) + r * a.ldz;
  write_row_grad<float, DzT, VEC>(x, dz, a.cols, a.col_offset, a.bias, a.bias_type, a.class_weight,
                                  o, rg);
}

// dZ of a grad-in-forward block from the fp16 terms e = exp(z - m) its fused statistics GEMM
// stored (m: the row's max over each kPartialStatsCols-column tile, in the tile's partial), now
// that the row's LSE is known: p = e exp(m - lse), and dZ is affine in p (AffineLogitGrad: no bias,
// soft-cap or class weights here). 2 bytes read and 2 written per logit, in place when dz aliases
// tile_exp (each thread reads its 8 columns before writing them). kVec: 8 columns per access, or 1
// when a pointer or pitch is not 16-byte aligned.
constexpr int kExpGradThreads = 256;
constexpr int kExpGradCols = 8;
static_assert(kPartialStatsCols % kExpGradCols == 0, "a group of columns lies in one tile");

template <typename DzT, int kVec>
__global__ void __launch_bounds__(kExpGradThreads) rows_grad_from_exp_kernel(RowGradArgs a) {
  __shared__ RowGrad row_grad;
  const int64_t r = blockIdx.x;
  if (threadIdx.x == 0) row_grad = row_grad_of(a, a.row_offset + r);
  __syncthreads();
  const RowGrad rg = row_grad;
  const AffineLogitGrad grad = AffineLogitGrad::of(rg.k, a.options.logit_scale);
  const __half* e = static_cast<const __half*>(a.tile_exp) + r * a.tile_exp_ld;
  DzT* dz = static_cast<DzT*>(a.dz) + r * a.ldz;
  const RowState* partials = a.partials + r * a.partials_ld;
  const int64_t label = rg.label - a.col_offset;
  // The label's p from the GEMM's fp32 logit where given (RowGradArgs::target_z).
  const float label_p =
      a.target_z != nullptr && label >= 0 ? softmax_exp(a.target_z[r] - rg.lse) : NAN;
  for (int64_t c0 = static_cast<int64_t>(threadIdx.x) * kExpGradCols; c0 < a.cols;
       c0 += static_cast<int64_t>(blockDim.x) * kExpGradCols) {
    // exp(m - lse) of the group's tile; 0 for a row with zero coefficients (no read of its terms
    // matters then).
    const float tile_scale =
        rg.zero ? 0.0f : softmax_exp(partials[c0 / kPartialStatsCols].max - rg.lse);
    const int n = a.cols - c0 < kExpGradCols ? static_cast<int>(a.cols - c0) : kExpGradCols;
    float v[kExpGradCols];
    load_group<__half, kExpGradCols, kVec == kExpGradCols>(e + c0, n, v);
#pragma unroll
    for (int i = 0; i < kExpGradCols; ++i) {
      v[i] = grad(v[i] * tile_scale);
      if (c0 + i == label) {
        v[i] = (a.target_z != nullptr ? grad(label_p) : v[i]) - grad.target_step;
      }
    }
    store_group<DzT, kExpGradCols, kVec == kExpGradCols>(dz + c0, n, v);
  }
}

Status invalid(const std::string& msg) { return Status::Error(StatusCode::kInvalidArgument, msg); }

// rows_grad from a fused statistics GEMM's fp16 terms (RowGradArgs::tile_exp).
Status launch_rows_grad_from_exp(const RowGradArgs& a, cudaStream_t stream) {
  if (!a.partials || a.partials_ld < (a.cols + kPartialStatsCols - 1) / kPartialStatsCols ||
      a.tile_exp_ld < a.cols) {
    return invalid(
        "rows_grad: tile_exp needs partials with partials_ld >= the block's tiles and "
        "tile_exp_ld >= cols");
  }
  if (a.bias || a.class_weight || a.options.softcap > 0.0f) {
    return invalid("rows_grad: tile_exp serves no bias, class weights or soft-cap");
  }
  if (a.dz_type == DType::kFloat32) return invalid("rows_grad: tile_exp needs a 16-bit dz_type");
  return dispatch_dtype(a.dz_type, [&](auto dz_tag) {
    using DzT = typename decltype(dz_tag)::type;
    const bool vec = is_aligned(a.tile_exp, 16) && a.tile_exp_ld % kExpGradCols == 0 &&
                     is_aligned(a.dz, 16) && a.ldz % kExpGradCols == 0;
    const dim3 grid(static_cast<unsigned>(a.rows));
    if (vec) {
      rows_grad_from_exp_kernel<DzT, kExpGradCols><<<grid, kExpGradThreads, 0, stream>>>(a);
    } else {
      rows_grad_from_exp_kernel<DzT, 1><<<grid, kExpGradThreads, 0, stream>>>(a);
    }
    FLCE_CUDA_CHECK_LAUNCH("rows_grad_from_exp_kernel");
    return Status::Ok();
  });
}

}  // namespace

Status launch_rows_forward(const RowForwardArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return Status::Ok();
  if (a.rows < 0 || a.rows > INT_MAX) {
    return invalid("rows_forward: rows must be in [0, " + std::to_string(INT_MAX) + "], got " +
                   std::to_string(a.rows));
  }
  const int64_t cols = a.cols > 0 ? a.cols : a.vocab_size;
  if (a.vocab_size < 1 || a.cols < 0 || a.col_offset < 0 || a.col_offset + cols > a.vocab_size ||
      (a.partials == nullptr && a.ld < cols)) {
    return invalid(
        "rows_forward: need vocab_size >= 1, columns [col_offset, col_offset + cols) within it "
        "and ld >= cols, got vocab_size " +
        std::to_string(a.vocab_size) + ", col_offset " + std::to_string(a.col_offset) + ", cols " +
        std::to_string(a.cols) + ", ld " + std::to_string(a.ld));
  }
  if (cols < a.vocab_size && (a.carry == nullptr || a.dz != nullptr)) {
    return invalid("rows_forward: a block of part of each row needs carry and no dz");
  }
  if (a.partials != nullptr) {
    if (a.dz != nullptr || a.target_z == nullptr || !a.labels || !a.scalars || !a.row_loss ||
        !a.lse || a.partials_ld < (cols + kFusedTileCols - 1) / kFusedTileCols) {
      return invalid(
          "rows_forward: partial statistics need target_z, labels, scalars, row_loss, lse, "
          "partials_ld >= the block's tiles and no dz");
    }
    rows_from_partials_kernel<<<static_cast<unsigned>(a.rows), kPartialThreads, 0, stream>>>(a);
    FLCE_CUDA_CHECK_LAUNCH("rows_from_partials_kernel");
    return Status::Ok();
  }
  if (!a.logits || !a.labels || !a.scalars || !a.row_loss || !a.lse) {
    return invalid("rows_forward: logits, labels, scalars, row_loss and lse must not be null");
  }
  if (a.dz != nullptr && a.ldz < a.vocab_size) {
    return invalid("rows_forward: ldz must be >= vocab_size (" + std::to_string(a.vocab_size) +
                   "), got " + std::to_string(a.ldz));
  }
  const int threads = row_threads(cols);
  return dispatch_dtype(a.logits_type, [&](auto logit_tag) {
    using LogitT = typename decltype(logit_tag)::type;
    return dispatch_dtype(a.dz_type, [&](auto dz_tag) {
      using DzT = typename decltype(dz_tag)::type;
      constexpr int kVec = 16 / sizeof(LogitT);
      const size_t bias_size = dtype_size(a.bias_type);
      const bool vec =
          is_aligned(a.logits, kVec * sizeof(LogitT)) && a.ld % kVec == 0 &&
          (a.bias == nullptr ||
           is_aligned(static_cast<const char*>(a.bias) + a.col_offset * bias_size,
                      kVec * bias_size)) &&
          (a.class_weight == nullptr ||
           is_aligned(a.class_weight + a.col_offset, kVec * sizeof(float))) &&
          (a.dz == nullptr || (is_aligned(a.dz, kVec * sizeof(DzT)) && a.ldz % kVec == 0));
      const dim3 grid(static_cast<unsigned>(a.rows));
      if (vec) {
        rows_forward_kernel<LogitT, DzT, kVec><<<grid, threads, 0, stream>>>(a);
      } else {
        rows_forward_kernel<LogitT, DzT, 1><<<grid, threads, 0, stream>>>(a);
      }
      FLCE_CUDA_CHECK_LAUNCH("rows_forward_kernel");
      return Status::Ok();
    });
  });
}

Status launch_rows_grad(const RowGradArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.cols == 0) return Status::Ok();
  if (a.rows < 0 || a.rows > INT_MAX || a.cols < 0) {
    return invalid("rows_grad: rows must be in [0, " + std::to_string(INT_MAX) +
                   "] and cols >= 0, got rows " + std::to_string(a.rows) + ", cols " +
                   std::to_string(a.cols));
  }
  if ((a.tile_exp == nullptr && a.ld < a.cols) || a.ldz < a.cols) {
    return invalid("rows_grad: ld and ldz must be >= cols (" + std::to_string(a.cols) +
                   "), got ld " + std::to_string(a.ld) + ", ldz " + std::to_string(a.ldz));
  }
  if (a.col_offset < 0 || a.col_offset + a.cols > a.vocab_size) {
    return invalid("rows_grad: columns [" + std::to_string(a.col_offset) + ", " +
                   std::to_string(a.col_offset + a.cols) + ") exceed vocab_size " +
                   std::to_string(a.vocab_size));
  }
  if ((!a.logits && !a.tile_exp) || !a.labels || !a.scalars || !a.lse || !a.dz) {
    return invalid("rows_grad: logits (or tile_exp), labels, scalars, lse and dz must not be null");
  }
  if (a.tile_exp) return launch_rows_grad_from_exp(a, stream);
  const int threads = row_threads(a.cols);
  return dispatch_dtype(a.dz_type, [&](auto dz_tag) {
    using DzT = typename decltype(dz_tag)::type;
    constexpr int kVec = 16 / sizeof(float);
    const bool vec = is_aligned(a.logits, kVec * sizeof(float)) && a.ld % kVec == 0 &&
                     (a.bias == nullptr || is_aligned(static_cast<const char*>(a.bias) +
                                                          a.col_offset * dtype_size(a.bias_type),
                                                      kVec * dtype_size(a.bias_type))) &&
                     (a.class_weight == nullptr ||
                      is_aligned(a.class_weight + a.col_offset, kVec * sizeof(float))) &&
                     is_aligned(a.dz, kVec * sizeof(DzT)) && a.ldz % kVec == 0;
    const dim3 grid(static_cast<unsigned>(a.rows));
    if (vec) {
      rows_grad_kernel<DzT, kVec><<<grid, threads, 0, stream>>>(a);
    } else {
      rows_grad_kernel<DzT, 1><<<grid, threads, 0, stream>>>(a);
    }
    FLCE_CUDA_CHECK_LAUNCH("rows_grad_kernel");
    return Status::Ok();
  });
}

}  // namespace flce::detail::cuda
