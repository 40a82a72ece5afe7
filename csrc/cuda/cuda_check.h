// Turning CUDA and cuBLASLt failures into flce::Status. Host-only, so the .cpp files of this
// backend (compiled by the host compiler) and the .cu files share one set of macros.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>

#include "flce/flce.h"

namespace flce::detail::cuda {

inline Status cuda_error(const char* call, const char* file, int line, cudaError_t e) {
  return Status::Error(StatusCode::kBackendError,
                       std::string("CUDA call `") + call + "` failed at " + file + ":" +
                           std::to_string(line) + ": " + cudaGetErrorName(e) + " (" +
                           cudaGetErrorString(e) + ")");
}

inline Status cublas_error(const char* call, const char* file, int line, cublasStatus_t s) {
  return Status::Error(StatusCode::kBackendError,
                       std::string("cuBLASLt call `") + call + "` failed at " + file + ":" +
                           std::to_string(line) + ": " + cublasLtGetStatusName(s) + " (" +
                           cublasLtGetStatusString(s) + ")");
}

}  // namespace flce::detail::cuda

#define FLCE_CUDA_CHECK(call)                                                        \
  do {                                                                               \
    const cudaError_t flce_err_ = (call);                                            \
    if (flce_err_ != cudaSuccess) {                                                  \
      return ::flce::detail::cuda::cuda_error(#call, __FILE__, __LINE__, flce_err_); \
    }                                                                                \
  } while (0)

// After a <<<...>>> launch: catches bad configurations (grid, block, shared memory) at once;
// errors inside the kernel surface asynchronously at the caller's next synchronization.
#define FLCE_CUDA_CHECK_LAUNCH(kernel_name)                                                 \
  do {                                                                                      \
    const cudaError_t flce_err_ = cudaGetLastError();                                       \
    if (flce_err_ != cudaSuccess) {                                                         \
      return ::flce::detail::cuda::cuda_error("launch of " kernel_name, __FILE__, __LINE__, \
                                              flce_err_);                                   \
    }                                                                                       \
  } while (0)

#define FLCE_CUBLAS_CHECK(call)                                                       \
  do {                                                                                \
    const cublasStatus_t flce_st_ = (call);                                           \
    if (flce_st_ != CUBLAS_STATUS_SUCCESS) {                                          \
      return ::flce::detail::cuda::cublas_error(#call, __FILE__, __LINE__, flce_st_); \
    }                                                                                 \
  } while (0)

#define FLCE_CUDA_RETURN_IF_ERROR(expr) \
  do {                                  \
    ::flce::Status flce_s_ = (expr);    \
    if (!flce_s_.ok()) return flce_s_;  \
  } while (0)
