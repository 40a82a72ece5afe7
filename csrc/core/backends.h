// Factories of the backends. Each backend folder defines its own; when CUDA is not built,
// csrc/core/cuda_disabled.cpp defines the CUDA ones.
#pragma once

#include <memory>

#include "backend.h"

namespace flce::detail {

BackendTraits cpu_traits();
// gemm_scratch: traits.gemm_scratch_bytes of workspace for the backend's own use.
std::unique_ptr<Backend> make_cpu_backend(void* gemm_scratch);

BackendTraits cuda_traits();
// stream: a cudaStream_t; gemm_scratch: gemm_scratch_bytes (>= traits.min_gemm_scratch_bytes) of
// device workspace for cuBLASLt. Returns null when the CUDA backend is not built in.
std::unique_ptr<Backend> make_cuda_backend(void* stream, bool allow_tf32, void* gemm_scratch,
                                           size_t gemm_scratch_bytes);
bool cuda_compiled();

}  // namespace flce::detail
