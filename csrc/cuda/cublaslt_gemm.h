// GemmArgs (row-major, see core/backend.h) on cuBLASLt.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "core/backend.h"
#include "flce/flce.h"

namespace flce::detail::cuda {

// The cuBLASLt workspace: what NVIDIA recommends for Hopper (smaller ones exclude some split-K
// and stream-K kernels).
constexpr size_t kCublasLtWorkspaceBytes = size_t(32) << 20;
// What the planner may lower it to under a small memory budget (the blocks are small then, and
// their GEMMs ran as fast with it on an H100; larger ones lose some kernels: planner.cpp).
constexpr size_t kMinCublasLtWorkspaceBytes = size_t(4) << 20;

// Runs C = alpha op(A) op(B) + beta C on `stream`. A and B share a dtype; C is fp32 or that dtype.
// `workspace` (workspace_bytes, 256-byte aligned, may be null with 0 bytes) is used by cuBLASLt
// for this call only. Beta = 0 never reads C. Never synchronizes; safe under CUDA graph capture
// once the shape has been seen (the first call of a shape runs the host-side heuristic).
Status cublaslt_gemm(const GemmArgs& args, cudaStream_t stream, void* workspace,
                     size_t workspace_bytes, bool allow_tf32);

// Measured algorithm choice (cublaslt_gemm.cpp says how and why): shapes first seen under it
// time the heuristic's top candidates on their first calls and keep the fastest. The mode comes
// from FLCE_GEMM_TUNING when the first GEMM runs (0: none, 1: every GEMM, unset: the GEMMs that
// ask for it, GemmArgs::measure_algorithm, among candidates that do not split K), or from
// set_cublaslt_tuning.
enum class GemmTuning { kNone, kRequested, kAll };
void set_cublaslt_tuning(GemmTuning mode);
GemmTuning cublaslt_tuning();

// Cached shapes of `device` whose algorithm is being measured, and those that settled on one.
struct CublasLtTuningCounts {
  size_t measuring = 0;
  size_t settled = 0;
};
Status cublaslt_tuning_counts(int device, CublasLtTuningCounts* out);

}  // namespace flce::detail::cuda
