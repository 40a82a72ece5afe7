// Host side of the fused logits GEMMs: when they apply, and argument checks before a launch.
#include "cuda/fused_logits.h"

#include <climits>
#include <mutex>
#include <string>

#include "cuda/cuda_check.h"

namespace flce::detail::cuda {
namespace {

Status invalid(const std::string& msg) { return Status::Error(StatusCode::kInvalidArgument, msg); }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The kernels are built for sm_90a, which runs on compute capability 9.0 only. Asked once per
// device: a host query, no synchronization.
bool device_is_sm90() {
  constexpr int kMaxDevices = 64;
  static std::mutex mu;
  static int state[kMaxDevices] = {};  // 0 unknown, 1 yes, 2 no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    cudaGetLastError();
    return false;
  }
  std::lock_guard<std::mutex> lock(mu);
  if (state[device] == 0) {
    int major = 0, minor = 0;
    const bool ok =
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess;
    if (!ok) cudaGetLastError();
    state[device] = ok && major == 9 && minor == 0 ? 1 : 2;
  }
  return state[device] == 1;
}

Status unsupported(const char* what) {
  return Status::Error(StatusCode::kNotCompiled,
                       std::string(what) +
                           ": the fused logits GEMM cannot run these operands and options on "
                           "this device");
}

// Options whose per-element cost the fused epilogues leave to the row kernels.
bool plain_options(const LossOptions& o, const void* bias, const float* class_weight) {
  return bias == nullptr && !(o.softcap > 0.0f) &&
         !(class_weight != nullptr && o.label_smoothing > 0.0f);
}

}  // namespace

bool fused_logits_supported(const LogitsOperands& op) {
#if FLCE_WITH_CUTLASS
  // TMA wants 16-byte aligned operands and row pitches (8 16-bit elements); the kernel's problem
  // shape is 32-bit.
  return (op.dtype == DType::kBFloat16 || op.dtype == DType::kFloat16) && op.rows > 0 &&
         op.cols > 0 && op.hidden > 0 && op.rows <= INT_MAX && op.cols <= INT_MAX &&
         op.hidden <= INT_MAX && op.hidden % 8 == 0 && op.ldx % 8 == 0 && op.ldw % 8 == 0 &&
         op.ldx >= op.hidden && op.ldw >= op.hidden && aligned16(op.x) && aligned16(op.weight) &&
         device_is_sm90();
#else
  (void)op;
  (void)aligned16;
  (void)device_is_sm90;
  return false;
#endif
}

bool fused_stats_supported(const LogitsOperands& op, const RowForwardArgs& a) {
  return a.row_metrics == nullptr && a.dz == nullptr &&
         plain_options(a.options, a.bias, a.class_weight) && fused_logits_supported(op);
}

bool fused_grad_supported(const LogitsOperands& op, const RowGradArgs& a) {
  return a.dz_type == op.dtype && a.ldz % 2 == 0 && reinterpret_cast<uintptr_t>(a.dz) % 4 == 0 &&
         plain_options(a.options, a.bias, a.class_weight) && fused_logits_supported(op);
}

Status launch_logits_stats(const LogitsOperands& op, const RowForwardArgs& a,
                           cudaStream_t stream) {
  if (!fused_stats_supported(op, a)) return unsupported("logits_stats");
  const int64_t tiles = (op.cols + kFusedTileCols - 1) / kFusedTileCols;
  if (a.rows != op.rows || a.cols != op.cols) {
    return invalid("logits_stats: the row block [" + std::to_string(a.rows) + ", " +
                   std::to_string(a.cols) + "] differs from the GEMM's [" +
                   std::to_string(op.rows) + ", " + std::to_string(op.cols) + "]");
  }
  if (a.partials == nullptr || a.target_z == nullptr || a.partials_ld < tiles) {
    return invalid("logits_stats: partials (with partials_ld >= " + std::to_string(tiles) +
                   ") and target_z must be given");
  }
  if (!a.labels || (a.col_offset < 0 || a.col_offset + a.cols > a.vocab_size)) {
    return invalid("logits_stats: labels must be given and the columns lie within vocab_size");
  }
  FLCE_CUDA_RETURN_IF_ERROR(launch_target_logits(op, a, stream));
#if FLCE_WITH_CUTLASS
  return op.dtype == DType::kBFloat16 ? sm90::logits_stats_bf16(op, a, stream)
                                      : sm90::logits_stats_fp16(op, a, stream);
#else
  (void)stream;
  return Status::Error(StatusCode::kNotCompiled, "logits_stats: built without CUTLASS");
#endif
}

Status launch_logits_grad(const LogitsOperands& op, const RowGradArgs& a, cudaStream_t stream) {
  if (!fused_grad_supported(op, a)) return unsupported("logits_grad");
  if (a.rows != op.rows || a.cols != op.cols) {
    return invalid("logits_grad: the dZ block [" + std::to_string(a.rows) + ", " +
                   std::to_string(a.cols) + "] differs from the GEMM's [" +
                   std::to_string(op.rows) + ", " + std::to_string(op.cols) + "]");
  }
  if (a.dz == nullptr || a.ldz < a.cols) {
    return invalid("logits_grad: dz must be given, with ldz >= cols");
  }
  if (!a.labels || !a.scalars || !a.lse || a.col_offset < 0 ||
      a.col_offset + a.cols > a.vocab_size) {
    return invalid(
        "logits_grad: labels, scalars and lse must be given and the columns lie within "
        "vocab_size");
  }
#if FLCE_WITH_CUTLASS
  return op.dtype == DType::kBFloat16 ? sm90::logits_grad_bf16(op, a, stream)
                                      : sm90::logits_grad_fp16(op, a, stream);
#else
  (void)stream;
  return Status::Error(StatusCode::kNotCompiled, "logits_grad: built without CUTLASS");
#endif
}

}  // namespace flce::detail::cuda
