// Row-shifted terms (Plan::shifted_terms): the kernels around the fused statistics GEMM that let
// grad-in-forward's dx and dW GEMMs read its terms as they are (in the input dtype).
//
// label_shift: each row's shift before the GEMM, the label's logit from a dot product (one warp
// per row). Its rounding differs from the GEMM's, which does not matter: the shift only has to be
// the same number wherever it is used, and the label's own term is recomputed from the GEMM's
// logit (ShiftedRow::label_term).
// shifted_rows: after the LSE, per row (one warp): its largest |x|, its ShiftedRow, factor * x,
// and the label's term for kept rows; then rewrite_terms rewrites every term of the other rows.
#include <algorithm>
#include <climits>

#include "core/row_math.h"
#include "cuda/common.cuh"
#include "cuda/fused_logits.h"
#include "cuda/launch.h"
#include "cuda/row_grad.cuh"

namespace flce::detail::cuda {
namespace {

Status invalid(const std::string& msg) { return Status::Error(StatusCode::kInvalidArgument, msg); }

// The 16-bit element types (x, W, the terms); fp32 is refused.
template <typename F>
Status dispatch_16bit(DType t, F&& f) {
  if (t == DType::kFloat32) return invalid("row-shifted terms: expected a 16-bit dtype");
  return dispatch_dtype(t, f);
}

// label_shift ---------------------------------------------------------------------------------

// The row kernels run one warp per row.
constexpr int kWarpRowsPerBlock = 8;

template <typename T>
__global__ void __launch_bounds__(kWarpRowsPerBlock* kWarpSize)
    label_shift_kernel(LabelShiftArgs a) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (r >= a.rows) return;  // uniform across the warp
  const int64_t label = load_label(a.labels, a.label_type, a.row_offset + r);
  if (!label_is_valid(label, a.ignore_index) || !label_in_range(label, a.vocab_size)) {
    if (lane == 0) a.shift[r] = -INFINITY;  // the row's tiles take their own max
    return;
  }
  const T* x = static_cast<const T*>(a.x) + r * a.ldx;
  const T* w = static_cast<const T*>(a.weight) + label * a.hidden;
  float dot = 0.0f;
  for (int64_t c = lane; c < a.hidden; c += kWarpSize)
    dot = fmaf(to_float(x[c]), to_float(w[c]), dot);
  dot = warp_reduce(dot, [](float u, float v) { return u + v; });
  if (lane == 0) a.shift[r] = dot * a.logit_scale + kShiftAboveLabel;
}

// shifted_rows --------------------------------------------------------------------------------
// Two kernels: one warp per row for what every row needs (its factor, factor * x, the label's
// term), then the rows to rewrite, listed by the first, spread over the whole GPU in groups of
// columns. One block per row did both: a rewritten row then rewrote its V terms alone on one SM,
// the launch's tail (0.58 ms of qwen-0.5b's 24.8 at 2048-row chunks, bench/NOTES.md version 11).

constexpr int kRewriteThreads = 256;
constexpr int kTermCols = 8;  // columns per access of the terms (16 bytes)
static_assert(kPartialStatsCols % kTermCols == 0, "a group of columns lies in one tile");
// Accesses per thread and work item, all loads issued before the first store: the kernel only
// streams (peaked logits rewrite nearly every term, 1 GB per chunk at Gemma-2). One 16-byte load
// in flight per thread, its terms in local memory, left it at a quarter of the HBM bandwidth (1.6
// ms per chunk; 0.64 ms now, bench/NOTES.md version 13).
constexpr int kRewriteAccesses = 4;
// Resident blocks per SM, which __launch_bounds__ guarantees (at most 64 registers per thread):
// 64 KB of loads in flight per SM. The grid is one wave of them.
constexpr int kRewriteBlocksPerSm = 4;
constexpr int64_t kRewriteCols = int64_t(kRewriteThreads) * kTermCols * kRewriteAccesses;

// A row's coefficients for an upstream gradient of 1 (the caller applies g): no smoothing, class
// weights or LSE gradient here, so dZ = slope p - step [c == label]. label is -1 where no term
// is the label's.
struct ShiftedRowCoefs {
  AffineLogitGrad grad;
  bool zero = false;
  float lse = 0.0f;
  int64_t label = -1;
};

__device__ __forceinline__ ShiftedRowCoefs shifted_row_coefs(const RowGradArgs& g, int64_t r) {
  const LossOptions& o = g.options;
  const int64_t row = g.row_offset + r;
  const int64_t label = load_label(g.labels, g.label_type, row);
  const bool valid = label_is_valid(label, o.ignore_index);
  const bool in_range = label_in_range(label, g.vocab_size);
  ShiftedRowCoefs c;
  c.lse = g.lse[row];
  const GradCoefs k = grad_coefs(valid, 1.0f, 0.0f, c.lse, in_range ? 1.0f : NAN,
                                 g.scalars[kScalarWeightSum], g.vocab_size, o);
  c.grad = AffineLogitGrad::of(k, o.logit_scale);
  c.zero = all_zero(k);
  c.label = valid && in_range ? label : -1;
  return c;
}

// XT: the dtype of x, the terms and x_scaled.
template <typename XT>
__global__ void __launch_bounds__(kWarpRowsPerBlock* kWarpSize)
    shifted_rows_kernel(ShiftedRowsArgs a) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (r >= a.grad.rows) return;  // uniform across the warp
  const XT* x = static_cast<const XT*>(a.x) + r * a.ldx;
  float xmax = 0.0f;
  for (int64_t c = lane; c < a.hidden; c += kWarpSize) xmax = fmaxf(xmax, fabsf(to_float(x[c])));
  xmax = warp_reduce(xmax, [](float u, float v) { return fmaxf(u, v); });
  // Every lane computes the row's numbers (the same loads, broadcast): no shared memory.
  const ShiftedRowCoefs k = shifted_row_coefs(a.grad, r);
  const ShiftedRow sr =
      shifted_row(a.shift[r], a.row_max[r], k.lse, a.target_z[r], k.grad, k.zero, xmax);
  if (lane == 0) a.row_factor[r] = sr.factor;

  // factor * x; exact zeros for a row without gradient, whatever x holds.
  XT* x_scaled = static_cast<XT*>(a.x_scaled) + r * a.hidden;
  for (int64_t c = lane; c < a.hidden; c += kWarpSize) {
    x_scaled[c] = from_float<XT>(sr.factor == 0.0f ? 0.0f : sr.factor * to_float(x[c]));
  }
  // A row without gradient keeps its terms: they are finite, and its factor zeroes them.
  if (lane != 0 || sr.factor == 0.0f) return;
  if (sr.rewrite) {
    a.rewrite_rows[atomicAdd(a.rewrite_count, 1)] = static_cast<int32_t>(r);
  } else if (k.label >= 0) {
    static_cast<XT*>(a.grad.dz)[r * a.grad.ldz + k.label] = from_float<XT>(sr.label_term);
  }
}

// Rewritten rows: e' = (slope p - step [c == label]) / factor, p = e exp(tile shift - lse), in
// work items of kRewriteCols columns of one listed row (a grid-stride loop: the list's length is
// only known on the device).
template <typename XT, int kVec>
__global__ void __launch_bounds__(kRewriteThreads, kRewriteBlocksPerSm)
    rewrite_terms_kernel(ShiftedRowsArgs a) {
  const RowGradArgs& g = a.grad;
  const int64_t items_per_row = (g.cols + kRewriteCols - 1) / kRewriteCols;
  const int64_t items = static_cast<int64_t>(*a.rewrite_count) * items_per_row;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t r = a.rewrite_rows[item / items_per_row];
    const int64_t begin = (item % items_per_row) * kRewriteCols;
    const int64_t end = begin + kRewriteCols < g.cols ? begin + kRewriteCols : g.cols;
    const ShiftedRowCoefs k = shifted_row_coefs(g, r);
    const float shift = a.shift[r];
    // The label's p from the GEMM's fp32 logit, not from its 16-bit term: slope p - step cancels
    // where p is large, and would multiply the term's rounding.
    const float label_grad =
        k.label >= 0 ? k.grad(softmax_exp(a.target_z[r] - k.lse)) - k.grad.target_step : 0.0f;
    const float inv_factor = 1.0f / a.row_factor[r];  // a power of two: exact
    const RowState* partials = g.partials + r * g.partials_ld;
    XT* e = static_cast<XT*>(g.dz) + r * g.ldz;
    float v[kRewriteAccesses][kTermCols];
    float tile_max[kRewriteAccesses];
    int n[kRewriteAccesses];
#pragma unroll
    for (int j = 0; j < kRewriteAccesses; ++j) {
      const int64_t c0 = begin + (int64_t(j) * kRewriteThreads + threadIdx.x) * kTermCols;
      n[j] = c0 >= end ? 0 : end - c0 < kTermCols ? static_cast<int>(end - c0) : kTermCols;
      if (n[j] == 0) continue;
      tile_max[j] = partials[c0 / kPartialStatsCols].max;
      load_group<XT, kTermCols, kVec == kTermCols>(e + c0, n[j], v[j]);
    }
#pragma unroll
    for (int j = 0; j < kRewriteAccesses; ++j) {
      if (n[j] == 0) continue;
      const int64_t c0 = begin + (int64_t(j) * kRewriteThreads + threadIdx.x) * kTermCols;
      const float tile_shift = tile_takes_row_shift(tile_max[j], shift) ? shift : tile_max[j];
      const float to_p = softmax_exp(tile_shift - k.lse);
#pragma unroll
      for (int i = 0; i < kTermCols; ++i) {
        v[j][i] = (c0 + i == k.label ? label_grad : k.grad(v[j][i] * to_p)) * inv_factor;
      }
      store_group<XT, kTermCols, kVec == kTermCols>(e + c0, n[j], v[j]);
    }
  }
}

}  // namespace

Status launch_label_shift(const LabelShiftArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return Status::Ok();
  if (a.rows < 0 || a.hidden < 1 || a.vocab_size < 1 || a.ldx < a.hidden || !a.x || !a.weight ||
      !a.labels || !a.shift) {
    return invalid(
        "label_shift: need rows >= 0, hidden >= 1, vocab_size >= 1, ldx >= hidden and x, "
        "weight, labels and shift");
  }
  const int64_t blocks = (a.rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock;
  if (blocks > INT_MAX) return invalid("label_shift: too many rows");
  return dispatch_16bit(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    label_shift_kernel<T>
        <<<static_cast<unsigned>(blocks), kWarpRowsPerBlock * kWarpSize, 0, stream>>>(a);
    FLCE_CUDA_CHECK_LAUNCH("label_shift_kernel");
    return Status::Ok();
  });
}

Status launch_shifted_rows(const ShiftedRowsArgs& a, cudaStream_t stream) {
  const RowGradArgs& g = a.grad;
  if (g.rows == 0) return Status::Ok();
  if (g.rows < 0 || g.rows > INT_MAX || g.cols != g.vocab_size || g.col_offset != 0) {
    return invalid("shifted_rows: needs whole rows (cols == vocab_size) and rows in [0, INT_MAX]");
  }
  if (!g.dz || g.dz != g.tile_exp || g.ldz != g.tile_exp_ld || g.dz_type != a.x_type ||
      !g.partials || !g.lse || !g.labels || !g.scalars || !a.shift || !a.row_max || !a.target_z ||
      !a.x || !a.row_factor || !a.x_scaled ||
      g.partials_ld < (g.cols + kPartialStatsCols - 1) / kPartialStatsCols ||
      g.tile_exp_ld < g.cols || a.ldx < a.hidden) {
    return invalid(
        "shifted_rows: needs the terms as tile_exp and dz (x's dtype, the same pitch >= cols), "
        "partials, lse, labels, scalars, shift, row_max, target_z, x (ldx >= hidden), "
        "row_factor and x_scaled");
  }
  if (g.bias || g.class_weight || g.grad_lse || g.options.softcap > 0.0f ||
      g.options.label_smoothing > 0.0f) {
    return invalid(
        "shifted_rows: serves no bias, class weights, LSE gradient, soft-cap or label smoothing");
  }
  if (!a.rewrite_rows || !a.rewrite_count) {
    return invalid("shifted_rows: needs rewrite_rows and rewrite_count");
  }
  return dispatch_16bit(a.x_type, [&](auto tag) {
    using XT = typename decltype(tag)::type;
    FLCE_CUDA_CHECK(cudaMemsetAsync(a.rewrite_count, 0, sizeof(int32_t), stream));
    const int64_t row_blocks = (g.rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock;
    shifted_rows_kernel<XT>
        <<<static_cast<unsigned>(row_blocks), kWarpRowsPerBlock * kWarpSize, 0, stream>>>(a);
    FLCE_CUDA_CHECK_LAUNCH("shifted_rows_kernel");
    // One wave of resident blocks: with many rewritten rows (peaked logits) the kernel streams
    // their terms and needs every SM's loads in flight; with none, each block returns at once.
    const int64_t items_per_row = (g.cols + kRewriteCols - 1) / kRewriteCols;
    const int64_t blocks = std::min<int64_t>(
        g.rows * items_per_row, static_cast<int64_t>(current_device_sms()) * kRewriteBlocksPerSm);
    const bool vec = is_aligned(g.dz, 16) && g.ldz % kTermCols == 0;
    if (vec) {
      rewrite_terms_kernel<XT, kTermCols>
          <<<static_cast<unsigned>(blocks), kRewriteThreads, 0, stream>>>(a);
    } else {
      rewrite_terms_kernel<XT, 1><<<static_cast<unsigned>(blocks), kRewriteThreads, 0, stream>>>(a);
    }
    FLCE_CUDA_CHECK_LAUNCH("rewrite_terms_kernel");
    return Status::Ok();
  });
}

}  // namespace flce::detail::cuda
