// The recompute backward's fused logits GEMM (dZ in the epilogue), bf16 and fp16.
#include "cuda/fused_logits.h"

#if FLCE_WITH_CUTLASS
#include "cuda/sm90_fused_logits.cuh"

namespace flce::detail::cuda::sm90 {

Status logits_grad_bf16(const LogitsOperands& op, const RowGradArgs& args, cudaStream_t s) {
  return run_fused_logits<__nv_bfloat16, GradMath<__nv_bfloat16>>(op, args, s);
}
Status logits_grad_fp16(const LogitsOperands& op, const RowGradArgs& args, cudaStream_t s) {
  return run_fused_logits<__half, GradMath<__half>>(op, args, s);
}

}  // namespace flce::detail::cuda::sm90
#endif
