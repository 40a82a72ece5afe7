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

// What the fused GEMMs need to know of a device, asked once per device (host queries, no
// synchronization): whether it is compute capability 9.0 (the kernels are built for sm_90a, which
// runs there only) and its SM count.
struct DeviceFacts {
  bool sm90 = false;
  int sms = 0;
};

DeviceFacts current_device() {
  constexpr int kMaxDevices = 64;
  static std::mutex mu;
  static DeviceFacts facts[kMaxDevices];
  static bool known[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    cudaGetLastError();
    return {};
  }
  std::lock_guard<std::mutex> lock(mu);
  if (!known[device]) {
    int major = 0, minor = 0, sms = 0;
    const bool ok =
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess &&
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess;
    if (!ok) cudaGetLastError();
    facts[device] = {ok && major == 9 && minor == 0, ok ? sms : 0};
    known[device] = true;
  }
  return facts[device];
}

Status unsupported(const char* what) {
  return Status::Error(StatusCode::kNotCompiled,
                       std::string(what) +
                           ": the fused logits GEMM cannot run these operands and options on "
                           "this device");
}

// Options whose per-element cost the fused epilogues leave to the row kernels.
bool plain_options(bool bias, bool softcap, bool weighted_smoothing) {
  return !bias && !softcap && !weighted_smoothing;
}
bool plain_options(const LossOptions& o, const void* bias, const float* class_weight) {
  return plain_options(bias != nullptr, o.softcap > 0.0f,
                       class_weight != nullptr && o.label_smoothing > 0.0f);
}

// What the kernels need whatever the operands' addresses: a build with them, this device, 16-bit
// inputs and a hidden size TMA can stride (8 elements) within the kernel's 32-bit problem shape.
bool fused_dtype_and_device(DType dtype, int64_t hidden) {
#if FLCE_WITH_CUTLASS
  return (dtype == DType::kBFloat16 || dtype == DType::kFloat16) && hidden > 0 && hidden % 8 == 0 &&
         hidden <= INT_MAX && current_device().sm90;
#else
  (void)dtype;
  (void)hidden;
  (void)current_device;
  return false;
#endif
}

}  // namespace

int current_device_sms() { return current_device().sms; }

bool fused_logits_supported(const LogitsOperands& op) {
  // TMA also wants 16-byte aligned operands and row pitches.
  return fused_dtype_and_device(op.dtype, op.hidden) && op.rows > 0 && op.cols > 0 &&
         op.rows <= INT_MAX && op.cols <= INT_MAX && op.ldx % 8 == 0 && op.ldw % 8 == 0 &&
         op.ldx >= op.hidden && op.ldw >= op.hidden && aligned16(op.x) && aligned16(op.weight);
}

bool fused_stats_supported(const LogitsOperands& op, const RowForwardArgs& a) {
  const bool exp_ok = a.tile_exp == nullptr || (a.tile_exp_ld % 8 == 0 && aligned16(a.tile_exp));
  return a.row_metrics == nullptr && a.dz == nullptr && exp_ok &&
         plain_options(a.options, a.bias, a.class_weight) && fused_logits_supported(op);
}

bool fused_grad_supported(const LogitsOperands& op, const RowGradArgs& a) {
  return a.dz_type == op.dtype && a.ldz % 8 == 0 && aligned16(a.dz) &&
         plain_options(a.options, a.bias, a.class_weight) && fused_logits_supported(op);
}

bool fused_logits_expected(const Problem& p) {
  return plain_options(p.has_bias, p.has_softcap, p.has_weighted_smoothing) &&
         fused_dtype_and_device(p.dtype, p.hidden_size);
}

// Where D >= kFusedPingpongMaxHidden the dZ epilogue runs while the tensor cores wait (the
// cooperative kernel has no stream-K and does not overlap epilogue and mainloop), so it pays off
// on blocks of several waves of CTA tiles only. Measured on an H100 (D = 4096): the lean plan's
// [2048, 2560] blocks (160 tiles of 128 x 256 for 132 SMs) took 1.4x the time of cuBLAS + the row
// kernel, a [2048, 8192] block (512 tiles) 0.9x. The same count, in 128 x 256 tiles, serves the
// ping-pong kernel (not measured apart).
constexpr int64_t kMinGradWaves = 3;

bool fused_grad_pays(const LogitsOperands& op) {
  const int64_t tiles = (op.rows + kFusedTileRows - 1) / kFusedTileRows *
                        ((op.cols + kFusedTileCols - 1) / kFusedTileCols);
  return tiles >= kMinGradWaves * current_device().sms;
}

Status launch_logits_stats(const LogitsOperands& op, const RowForwardArgs& a, cudaStream_t stream) {
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
#if FLCE_WITH_CUTLASS
  if (a.tile_exp != nullptr) {
    if (a.tile_exp_ld < a.cols) return invalid("logits_stats: tile_exp_ld must be >= cols");
    if (op.dtype == DType::kFloat16) return sm90::logits_stats_exp_fp16(op, a, stream);
    return a.row_shift != nullptr ? sm90::logits_stats_shifted_bf16(op, a, stream)
                                  : sm90::logits_stats_exp_bf16(op, a, stream);
  }
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
  if (a.ldz < a.cols) return invalid("logits_grad: ldz must be >= cols");
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
