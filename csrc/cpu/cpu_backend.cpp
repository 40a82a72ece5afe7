// The CPU backend: fp32 GEMMs (OpenBLAS or the portable fallback) and OpenMP row kernels.
#include <cstring>
#include <memory>

#include "core/backends.h"
#include "cpu/cpu_gemm.h"
#include "cpu/cpu_rows.h"

namespace flce::detail {
namespace {

// The CPU GEMMs run in fp32 whatever the input dtype, so dZ stays fp32: no rounding of the
// gradient before the dx / dW GEMMs.
DType cpu_dz_type(DType) { return DType::kFloat32; }

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(void* gemm_scratch) : gemm_scratch_(gemm_scratch) {}

  Status gemm(const GemmArgs& args) override { return cpu::gemm(args, gemm_scratch_); }
  Status prepare(const PrepareArgs& args) override { return cpu::prepare(args); }
  Status rows_forward(const RowForwardArgs& args) override { return cpu::rows_forward(args); }
  Status rows_grad(const RowGradArgs& args) override { return cpu::rows_grad(args); }
  Status column_sum(const ColumnSumArgs& args) override { return cpu::column_sum(args); }
  Status finalize(const FinalizeArgs& args) override { return cpu::finalize(args); }
  Status fill_zero(void* ptr, size_t bytes) override {
    if (bytes > 0) std::memset(ptr, 0, bytes);
    return Status::Ok();
  }
  Status scale(void* data, DType type, int64_t count, const float* factor) override {
    return cpu::scale(data, type, count, factor);
  }
  Status cast(const CastArgs& args) override { return cpu::cast(args); }

 private:
  void* gemm_scratch_;
};

}  // namespace

BackendTraits cpu_traits() {
  BackendTraits t;
  t.dz_type = &cpu_dz_type;
  t.gemm_scratch_bytes = cpu::kGemmScratchBytes;
  t.min_gemm_scratch_bytes = cpu::kGemmScratchBytes;  // its panels have a fixed size
  return t;
}

std::unique_ptr<Backend> make_cpu_backend(void* gemm_scratch) {
  return std::make_unique<CpuBackend>(gemm_scratch);
}

}  // namespace flce::detail
