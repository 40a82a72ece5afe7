// The CUDA backend: the Backend primitives on one stream, and the factories the driver calls.
// Construction does no CUDA work (the driver builds a backend per call); nothing here
// synchronizes the host or allocates device memory, so a call can be captured in a CUDA graph.
#include <cuda_runtime.h>

#include <memory>

#include "core/backend.h"
#include "core/backends.h"
#include "cuda/cublaslt_gemm.h"
#include "cuda/cuda_check.h"
#include "cuda/fused_logits.h"
#include "cuda/launch.h"

namespace flce::detail {
namespace {

class CudaBackend final : public Backend {
 public:
  CudaBackend(cudaStream_t stream, bool allow_tf32, void* gemm_scratch, size_t gemm_scratch_bytes)
      : stream_(stream),
        allow_tf32_(allow_tf32),
        gemm_scratch_(gemm_scratch),
        gemm_scratch_bytes_(gemm_scratch ? gemm_scratch_bytes : 0) {}

  Status gemm(const GemmArgs& args) override {
    return cuda::cublaslt_gemm(args, stream_, gemm_scratch_, gemm_scratch_bytes_, allow_tf32_);
  }
  Status prepare(const PrepareArgs& args) override { return cuda::launch_prepare(args, stream_); }
  Status rows_forward(const RowForwardArgs& args) override {
    return cuda::launch_rows_forward(args, stream_);
  }
  Status rows_grad(const RowGradArgs& args) override {
    return cuda::launch_rows_grad(args, stream_);
  }
  Status column_sum(const ColumnSumArgs& args) override {
    return cuda::launch_column_sum(args, stream_);
  }
  Status finalize(const FinalizeArgs& args) override {
    return cuda::launch_finalize(args, stream_);
  }
  Status fill_zero(void* ptr, size_t bytes) override {
    if (bytes == 0) return Status::Ok();
    if (ptr == nullptr) {
      return Status::Error(StatusCode::kInvalidArgument, "fill_zero: ptr must not be null");
    }
    FLCE_CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, stream_));
    return Status::Ok();
  }

  Status scale(void* data, DType type, int64_t count, const float* factor) override {
    return cuda::launch_scale(data, type, count, factor, stream_);
  }

  bool fused_stats(const LogitsOperands& op, const RowForwardArgs& args) const override {
    return cuda::fused_stats_supported(op, args);
  }
  bool fused_grad(const LogitsOperands& op, const RowGradArgs& args) const override {
    return cuda::fused_grad_supported(op, args);
  }
  bool fused_grad_pays(const LogitsOperands& op) const override {
    return cuda::fused_grad_pays(op);
  }
  Status logits_stats(const LogitsOperands& op, const RowForwardArgs& args) override {
    return cuda::launch_logits_stats(op, args, stream_);
  }
  Status logits_grad(const LogitsOperands& op, const RowGradArgs& args) override {
    return cuda::launch_logits_grad(op, args, stream_);
  }
  Status label_shift(const LabelShiftArgs& args) override {
    return cuda::launch_label_shift(args, stream_);
  }
  Status shifted_rows(const ShiftedRowsArgs& args) override {
    return cuda::launch_shifted_rows(args, stream_);
  }
  Status cast(const CastArgs& args) override { return cuda::launch_cast(args, stream_); }

 private:
  cudaStream_t stream_;
  bool allow_tf32_;
  void* gemm_scratch_;  // the cuBLASLt workspace carved from the caller's workspace, or null
  size_t gemm_scratch_bytes_;
};

// dZ blocks stay in the input dtype: they feed bf16 / fp16 tensor-core GEMMs and take half the
// memory of fp32 ones.
DType cuda_dz_type(DType input) { return input; }

}  // namespace

BackendTraits cuda_traits() {
  BackendTraits t;
  t.dz_type = &cuda_dz_type;
  t.gemm_scratch_bytes = cuda::kCublasLtWorkspaceBytes;
  t.min_gemm_scratch_bytes = cuda::kMinCublasLtWorkspaceBytes;
  t.fused_logits_expected = &cuda::fused_logits_expected;
  return t;
}

std::unique_ptr<Backend> make_cuda_backend(void* stream, bool allow_tf32, void* gemm_scratch,
                                           size_t gemm_scratch_bytes) {
  return std::make_unique<CudaBackend>(static_cast<cudaStream_t>(stream), allow_tf32, gemm_scratch,
                                       gemm_scratch_bytes);
}

bool cuda_compiled() { return true; }

}  // namespace flce::detail
