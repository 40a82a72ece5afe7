// The CPU GEMM behind Backend::gemm: CBLAS sgemm when built with FLCE_WITH_BLAS=1, else a portable
// blocked OpenMP GEMM. fp16 / bf16 operands and outputs go through fp32 panels of a fixed size in
// the caller's scratch, so the memory a plan reports does not grow with the problem.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/backend.h"

namespace flce::detail::cpu {

// Panel shape for fp16 / bf16 operands. 512 x 512 x 512 keeps each sgemm call large enough to run
// near BLAS peak while the conversion (once per panel) stays a few percent of the flops.
constexpr int64_t kGemmBlockM = 512;
constexpr int64_t kGemmBlockN = 512;
constexpr int64_t kGemmBlockK = 512;
constexpr size_t kGemmScratchBytes =
    static_cast<size_t>(kGemmBlockM * kGemmBlockK + kGemmBlockK * kGemmBlockN +
                        kGemmBlockM * kGemmBlockN) *
    sizeof(float);

// C = alpha op(A) op(B) + beta C (see GemmArgs). `scratch` holds kGemmScratchBytes; it may be null
// when every operand and the output are fp32.
Status gemm(const GemmArgs& args, void* scratch);

// The fp32 kernel underneath, with row-major CBLAS semantics (beta = 0 ignores C, even NaN).
Status sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
             const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
             int64_t ldc);

}  // namespace flce::detail::cpu
