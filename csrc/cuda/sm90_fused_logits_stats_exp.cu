// The grad-in-forward's fused logits GEMM (row statistics and the fp16 terms exp(z - tile max) in
// the epilogue), bf16 and fp16, and with row-shifted terms in bf16 for bf16 inputs (fp16 inputs
// keep fp16 terms either way).
// CUTLASS's device-side asserts are function calls, and a call inside the mainloop makes ptxas
// serialize the wgmma pipeline (warning C7510), which left the fused GEMMs far below cuBLAS. They
// are compiled out here whatever the build type.
#ifndef NDEBUG
#define NDEBUG
#endif
#include "cuda/fused_logits.h"

#if FLCE_WITH_CUTLASS
#include "cuda/sm90_fused_logits.cuh"

namespace flce::detail::cuda::sm90 {

Status logits_stats_exp_bf16(const LogitsOperands& op, const RowForwardArgs& args, cudaStream_t s) {
  return run_fused_logits<__nv_bfloat16, StatsMath<true>>(op, args, s);
}
Status logits_stats_exp_fp16(const LogitsOperands& op, const RowForwardArgs& args, cudaStream_t s) {
  return run_fused_logits<__half, StatsMath<true>>(op, args, s);
}
Status logits_stats_shifted_bf16(const LogitsOperands& op, const RowForwardArgs& args,
                                 cudaStream_t s) {
  return run_fused_logits<__nv_bfloat16, StatsMath<true, __nv_bfloat16>>(op, args, s);
}

}  // namespace flce::detail::cuda::sm90
#endif
