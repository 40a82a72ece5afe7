// Device pieces of the row kernels (row_kernels.cu): merging
// RowStates across a block, and finishing a row from its statistics.
#pragma once

#include "core/backend.h"
#include "core/row_math.h"
#include "cuda/common.cuh"

namespace flce::detail::cuda {

// RowState across the block ------------------------------------------------------------------

__device__ __forceinline__ RowState shfl_xor_state(const RowState& s, int mask) {
  RowState o;
  o.max = __shfl_xor_sync(kFullMask, s.max, mask);
  o.sum_exp = __shfl_xor_sync(kFullMask, s.sum_exp, mask);
  o.sum_exp_z = __shfl_xor_sync(kFullMask, s.sum_exp_z, mask);
  o.sum_wz = __shfl_xor_sync(kFullMask, s.sum_wz, mask);
  o.sum_z2 = __shfl_xor_sync(kFullMask, s.sum_z2, mask);
  o.best = __shfl_xor_sync(kFullMask, s.best, mask);
  o.argmax =
      static_cast<int64_t>(__shfl_xor_sync(kFullMask, static_cast<long long>(s.argmax), mask));
  return o;
}

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

// What thread 0 hands the dZ pass of its row.
struct RowGrad {
  GradCoefs k;
  float lse = 0.0f;
  int64_t label = -1;  // global column of the target (never matches when ignored or out of range)
  bool zero = true;    // every coefficient is 0: write zeros without reading the row
};

__device__ __forceinline__ bool all_zero(const GradCoefs& k) {
  return k.coef_p == 0.0f && k.coef_target == 0.0f && k.coef_weight == 0.0f;
}

// Finishes row `row` of a rows_forward call from its merged statistics: loss, LSE and metrics
// (when `write_outputs`; x is the row's raw logits, read at the label), and the coefficients of
// its gradient. Called by one thread per row.
template <typename LogitT>
__device__ __forceinline__ RowGrad finish_forward_row(const RowForwardArgs& a, int64_t row,
                                                      const RowState& st, const LogitT* x,
                                                      bool write_outputs) {
  const LossOptions& o = a.options;
  const int64_t vocab = a.vocab_size;
  const float lse = st.lse();
  const int64_t label = load_label(a.labels, a.label_type, row);
  const bool valid = label_is_valid(label, o.ignore_index);
  const bool in_range = label_in_range(label, vocab);
  // An out-of-range label has no target logit or weight: NaN makes the row's loss (and its
  // gradient) NaN instead of silently wrong.
  const float w_target =
      in_range ? (a.class_weight != nullptr ? a.class_weight[label] : 1.0f) : NAN;
  const float weight_sum = a.scalars[kScalarWeightSum];
  if (write_outputs) {
    float z_target = NAN;
    if (in_range) {
      float raw = to_float(x[label]);
      if (a.bias != nullptr) raw += load_dynamic(a.bias, a.bias_type, label);
      z_target = transform_logit(raw, o.logit_scale, o.softcap);
    }
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

}  // namespace flce::detail::cuda
