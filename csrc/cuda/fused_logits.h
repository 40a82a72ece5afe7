// Host entry points of the fused logits GEMMs (sm90_fused_logits.cuh): a CUTLASS Hopper GEMM
// whose epilogue applies the row math to the fp32 accumulators, so that the logits block is
// never stored. Built when CUTLASS is found (FLCE_WITH_CUTLASS) and run on compute capability 9.0
// for bf16 / fp16 inputs; everything else takes the cuBLASLt GEMM + row kernel path.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/backend.h"

namespace flce::detail::cuda {

// Rows and columns of one CTA tile of the cooperative kernel (ping-pong tiles have 64 rows); the
// columns of a tile are summarized by one partial RowState.
constexpr int64_t kFusedTileRows = 128;
constexpr int64_t kFusedTileCols = 256;
// Below this hidden size the fused GEMMs run ping-pong consumers, which overlap one tile's epilogue
// with another's mainloop (see sm90_fused_logits.cuh for the measurements).
constexpr int64_t kFusedPingpongMaxHidden = 2048;
static_assert(kFusedTileCols == kPartialStatsCols, "one partial RowState per CTA tile of columns");

// Whether this build and the current device can run the fused GEMMs on `op` (dtype, alignment of
// the TMA operands, sizes that fit the kernel's 32-bit problem shape), and whether their
// epilogues serve the call's options: logit scale, z-loss, unweighted label smoothing, any
// reduction; not bias, soft-capping, metrics or class-weighted smoothing (see
// sm90_fused_logits.cuh for why).
bool fused_logits_supported(const LogitsOperands& op);
bool fused_stats_supported(const LogitsOperands& op, const RowForwardArgs& args);
bool fused_grad_supported(const LogitsOperands& op, const RowGradArgs& args);
// Whether the fused GEMMs will serve the statistics-only forward blocks and the recompute dZ blocks
// of `p` on the current device, given 16-byte aligned operands (the planner's question: see
// BackendTraits::fused_logits_expected); the forward's also need no metrics.
bool fused_logits_expected(const Problem& p);
// Whether the fused dZ GEMM is expected to be faster than cuBLASLt + the row kernel on `op`.
bool fused_grad_pays(const LogitsOperands& op);
// SM count of the current device (asked once per device); the persistent kernels size their grid
// by it.
int current_device_sms();

Status launch_logits_stats(const LogitsOperands& op, const RowForwardArgs& args,
                           cudaStream_t stream);
Status launch_logits_grad(const LogitsOperands& op, const RowGradArgs& args, cudaStream_t stream);

namespace sm90 {
// In sm90_fused_logits_{stats,stats_exp,grad}.cu.
Status logits_stats_bf16(const LogitsOperands& op, const RowForwardArgs& args, cudaStream_t s);
Status logits_stats_fp16(const LogitsOperands& op, const RowForwardArgs& args, cudaStream_t s);
Status logits_stats_exp_bf16(const LogitsOperands& op, const RowForwardArgs& args, cudaStream_t s);
Status logits_stats_exp_fp16(const LogitsOperands& op, const RowForwardArgs& args, cudaStream_t s);
// Row-shifted bf16 terms for bf16 inputs (RowForwardArgs::row_shift); fp16 inputs take
// logits_stats_exp_fp16, whose terms are fp16 either way.
Status logits_stats_shifted_bf16(const LogitsOperands& op, const RowForwardArgs& args,
                                 cudaStream_t s);
Status logits_grad_bf16(const LogitsOperands& op, const RowGradArgs& args, cudaStream_t s);
Status logits_grad_fp16(const LogitsOperands& op, const RowGradArgs& args, cudaStream_t s);
}  // namespace sm90

}  // namespace flce::detail::cuda
