// Per-row pieces shared by the row kernels (row_kernels.cu) and the fused GEMM epilogues
// (sm90_fused_logits.cuh): what a row's dZ pass needs, and RowState exchanged between threads.
#pragma once

#include "core/backend.h"
#include "core/row_math.h"
#include "cuda/common.cuh"

namespace flce::detail::cuda {

// What the dZ pass of one row needs.
struct RowGrad {
  GradCoefs k;
  float lse = 0.0f;
  int64_t label = -1;  // global column of the target (never matches when ignored or out of range)
  bool zero = true;    // every coefficient is 0: write zeros without reading the row
};

__device__ __forceinline__ bool all_zero(const GradCoefs& k) {
  return k.coef_p == 0.0f && k.coef_target == 0.0f && k.coef_weight == 0.0f;
}

// The dZ pass of global row `row` of a recompute backward, whose LSE is known.
__device__ __forceinline__ RowGrad row_grad_of(const RowGradArgs& a, int64_t row) {
  const LossOptions& o = a.options;
  const int64_t label = load_label(a.labels, a.label_type, row);
  const bool valid = label_is_valid(label, o.ignore_index);
  const bool in_range = label_in_range(label, a.vocab_size);
  // An out-of-range label has no target weight: NaN makes the row's gradient NaN instead of
  // silently wrong.
  float w_target = NAN;
  if (in_range) w_target = a.class_weight != nullptr ? a.class_weight[label] : 1.0f;
  const float lse = a.lse[row];
  const float g = row_upstream(o.reduction, a.grad_loss, row, a.scalars[kScalarInvDenominator]);
  const float g_lse = a.grad_lse != nullptr ? a.grad_lse[row] : 0.0f;
  RowGrad rg;
  rg.k = grad_coefs(valid, g, g_lse, lse, w_target, a.scalars[kScalarWeightSum], a.vocab_size, o);
  rg.lse = lse;
  rg.label = valid && in_range ? label : -1;
  rg.zero = all_zero(rg.k);
  return rg;
}

// The RowState of the lane `mask` away (every lane of the warp must call it).
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

}  // namespace flce::detail::cuda
