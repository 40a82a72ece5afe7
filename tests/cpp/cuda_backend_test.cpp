// The CUDA backend through the public API (make_plan, forward, backward, cross_entropy_logits),
// checked against the float64 reference (tests/cpp/reference.h) and against the CPU backend on
// the same inputs. Skipped when no CUDA device is present; compiled to nothing without CUDA.
//
// Running it (from the build directory of a CUDA build):
//   ./flce_tests --gtest_filter='Cuda*'
// Under the sanitizers, leaving out the N * V > 2^31 case (about 10 GiB, minutes under memcheck):
//   F='Cuda*:-CudaEdge.BeyondInt32Elements'
//   compute-sanitizer --tool memcheck --leak-check full ./flce_tests --gtest_filter="$F"
//   compute-sanitizer --tool racecheck ./flce_tests --gtest_filter="$F"
//   compute-sanitizer --tool synccheck ./flce_tests --gtest_filter="$F"
// racecheck matters for the row kernels, whose dZ may overwrite the logits they read in place.
#if defined(FLCE_WITH_CUDA) && FLCE_WITH_CUDA

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/backends.h"
#include "core/workspace.h"
#include "cuda/cublaslt_gemm.h"
#include "cuda/fused_logits.h"
#include "harness.h"
#include "reference.h"

namespace flce::test {
namespace {

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(e) + " (" +
                             cudaGetErrorString(e) + ")");
  }
}
#define CUDA_CHECK(call) cuda_check((call), #call)

bool have_device() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

#define SKIP_WITHOUT_DEVICE() \
  if (!have_device()) GTEST_SKIP() << "no CUDA device"

// Device memory filled with NaN bytes (0xff is NaN in fp32, fp16 and bf16), followed by canary
// bytes that must survive every call.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    CUDA_CHECK(cudaMalloc(&ptr_, bytes + kCanary));
    CUDA_CHECK(cudaMemset(ptr_, 0xff, bytes));
    const std::vector<unsigned char> canary = canary_bytes();
    CUDA_CHECK(cudaMemcpy(static_cast<char*>(ptr_) + bytes, canary.data(), kCanary,
                          cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }

  // Null for an empty buffer, as the API expects for absent optional inputs of size 0.
  void* get() const { return bytes_ == 0 ? nullptr : ptr_; }
  // Never null: for inputs the API requires even when they hold no element.
  void* raw() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  void poison() const {
    if (bytes_) CUDA_CHECK(cudaMemset(ptr_, 0xff, bytes_));
  }
  void upload(const void* src, size_t n) const {
    if (n) CUDA_CHECK(cudaMemcpy(ptr_, src, n, cudaMemcpyHostToDevice));
  }
  void download(void* dst, size_t n) const {
    if (n) CUDA_CHECK(cudaMemcpy(dst, ptr_, n, cudaMemcpyDeviceToHost));
  }
  bool canary_intact() const {
    if (!ptr_) return true;
    std::vector<unsigned char> got(kCanary);
    CUDA_CHECK(
        cudaMemcpy(got.data(), static_cast<char*>(ptr_) + bytes_, kCanary, cudaMemcpyDeviceToHost));
    return got == canary_bytes();
  }

 private:
  static constexpr size_t kCanary = 512;
  static std::vector<unsigned char> canary_bytes() {
    std::vector<unsigned char> c(kCanary);
    for (size_t i = 0; i < kCanary; ++i) c[i] = static_cast<unsigned char>(0x5a ^ i);
    return c;
  }
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

template <typename T>
DeviceBuffer to_device(const std::vector<T>& v) {
  DeviceBuffer b(v.size() * sizeof(T));
  b.upload(v.data(), v.size() * sizeof(T));
  return b;
}
DeviceBuffer to_device(const TypedBuffer& t) {
  const size_t bytes = static_cast<size_t>(t.size()) * dtype_size(t.type());
  DeviceBuffer b(bytes);
  b.upload(t.data(), bytes);
  return b;
}

// The inputs of a Case on the device.
struct DeviceInputs {
  DeviceBuffer x, weight, bias, labels, class_weight, grad_loss, grad_lse;
};

DeviceInputs upload(const Case& c, const Inputs& in) {
  DeviceInputs d;
  d.x = to_device(in.x);
  d.weight = to_device(in.weight);
  if (c.bias) d.bias = to_device(in.bias);
  d.labels = c.int32_labels ? to_device(in.labels32) : to_device(in.labels64);
  if (c.class_weights) d.class_weight = to_device(in.class_weight);
  d.grad_loss = to_device(in.grad_loss);
  if (c.grad_lse) d.grad_lse = to_device(in.grad_lse);
  return d;
}

Plan cuda_plan(const Case& c, const PlanChoice& choice) {
  const Problem prob = make_problem(c);
  Plan plan;
  if (choice.manual) {
    plan = choice.plan;
    const detail::BackendTraits traits = detail::backend_traits(Device::kCuda);
    plan.forward_workspace_bytes = detail::forward_layout(prob, plan, traits).total;
    plan.backward_workspace_bytes = detail::backward_layout(prob, plan, traits).total;
  } else {
    const Status s = make_plan(prob, Device::kCuda, choice.budget, choice.strategy, &plan);
    if (!s.ok()) throw std::runtime_error("make_plan failed: " + s.message);
  }
  return plan;
}

// Device outputs of one fused call.
struct DeviceOutputs {
  DeviceBuffer loss, lse, metrics, dx, dw, db;
};

DeviceOutputs make_outputs(const Case& c) {
  DeviceOutputs o;
  const int64_t n = c.n;
  o.loss = DeviceBuffer(sizeof(float) *
                        (c.options.reduction == Reduction::kNone ? std::max<int64_t>(n, 1) : 1));
  o.lse = DeviceBuffer(sizeof(float) * std::max<int64_t>(n, 1));
  o.metrics = DeviceBuffer(sizeof(float) * kNumMetrics);
  o.dx = DeviceBuffer(n * c.d * dtype_size(c.dtype));
  o.dw = DeviceBuffer(c.v * c.d * dtype_size(c.dtype));
  o.db = DeviceBuffer(c.v * dtype_size(c.dtype));
  return o;
}

ForwardParams forward_params(const Case& c, const Inputs& in, const DeviceInputs& d,
                             const DeviceOutputs& o, const Plan& plan) {
  const Problem prob = make_problem(c);
  ForwardParams f;
  f.x = d.x.raw();
  f.x_row_stride = in.x_stride;
  f.weight = d.weight.raw();
  f.bias = c.bias ? d.bias.raw() : nullptr;
  f.labels = d.labels.raw();
  f.label_type = in.label_type();
  f.class_weight = c.class_weights ? static_cast<const float*>(d.class_weight.raw()) : nullptr;
  f.num_tokens = c.n;
  f.vocab_size = c.v;
  f.hidden_size = c.d;
  f.dtype = c.dtype;
  f.options = c.options;
  f.loss = static_cast<float*>(o.loss.raw());
  f.lse = static_cast<float*>(o.lse.raw());
  f.metrics = c.metrics ? static_cast<float*>(o.metrics.raw()) : nullptr;
  if (plan.strategy == Strategy::kGradInForward) {
    f.grad_x = prob.needs_grad_x ? o.dx.raw() : nullptr;
    f.grad_weight = prob.needs_grad_weight ? o.dw.raw() : nullptr;
    f.grad_bias = prob.needs_grad_bias ? o.db.raw() : nullptr;
  }
  f.plan = plan;
  return f;
}

BackwardParams backward_params(const Case& c, const Inputs& in, const DeviceInputs& d,
                               const DeviceOutputs& o, const Plan& plan) {
  const Problem prob = make_problem(c);
  BackwardParams b;
  b.x = d.x.raw();
  b.x_row_stride = in.x_stride;
  b.weight = d.weight.raw();
  b.bias = c.bias ? d.bias.raw() : nullptr;
  b.labels = d.labels.raw();
  b.label_type = in.label_type();
  b.class_weight = c.class_weights ? static_cast<const float*>(d.class_weight.raw()) : nullptr;
  b.num_tokens = c.n;
  b.vocab_size = c.v;
  b.hidden_size = c.d;
  b.dtype = c.dtype;
  b.options = c.options;
  b.lse = static_cast<const float*>(o.lse.raw());
  b.grad_loss = static_cast<const float*>(d.grad_loss.raw());
  b.grad_lse = c.grad_lse ? static_cast<const float*>(d.grad_lse.raw()) : nullptr;
  b.grad_x = prob.needs_grad_x ? o.dx.raw() : nullptr;
  b.grad_weight = prob.needs_grad_weight ? o.dw.raw() : nullptr;
  b.grad_bias = prob.needs_grad_bias ? o.db.raw() : nullptr;
  b.plan = plan;
  return b;
}

void download(const Case& c, const DeviceOutputs& o, Outputs* out) {
  out->loss.assign(o.loss.bytes() / sizeof(float), NAN);
  o.loss.download(out->loss.data(), o.loss.bytes());
  out->lse.assign(o.lse.bytes() / sizeof(float), NAN);
  o.lse.download(out->lse.data(), o.lse.bytes());
  out->metrics.assign(kNumMetrics, NAN);
  o.metrics.download(out->metrics.data(), o.metrics.bytes());
  out->dx = TypedBuffer(c.dtype, c.n * c.d);
  out->dw = TypedBuffer(c.dtype, c.v * c.d);
  out->db = TypedBuffer(c.dtype, c.v);
  o.dx.download(out->dx.data(), o.dx.bytes());
  o.dw.download(out->dw.data(), o.dw.bytes());
  o.db.download(out->db.data(), o.db.bytes());
  for (const DeviceBuffer* b : {&o.loss, &o.lse, &o.metrics, &o.dx, &o.dw, &o.db}) {
    EXPECT_TRUE(b->canary_intact()) << "an output was written past its end";
  }
}

// forward (and backward for recompute) on the CUDA backend, on the default stream.
bool run_fused_cuda(const Case& c, const Inputs& in, const PlanChoice& choice, Outputs* out) {
  const Problem prob = make_problem(c);
  const Plan plan = cuda_plan(c, choice);
  out->plan = plan;
  out->has_grads = prob.needs_grad_x || prob.needs_grad_weight || prob.needs_grad_bias;
  const DeviceInputs d = upload(c, in);
  const DeviceOutputs o = make_outputs(c);
  {
    ForwardParams f = forward_params(c, in, d, o, plan);
    DeviceBuffer ws(plan.forward_workspace_bytes);
    f.workspace = ws.get();
    f.workspace_bytes = ws.bytes();
    const Status s = forward(Device::kCuda, f);
    if (!s.ok()) {
      ADD_FAILURE() << "forward failed: " << s.message;
      return false;
    }
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_TRUE(ws.canary_intact()) << "forward wrote past its workspace";
  }
  if (plan.strategy == Strategy::kRecompute && out->has_grads) {
    BackwardParams b = backward_params(c, in, d, o, plan);
    DeviceBuffer ws(plan.backward_workspace_bytes);
    b.workspace = ws.get();
    b.workspace_bytes = ws.bytes();
    const Status s = backward(Device::kCuda, b);
    if (!s.ok()) {
      ADD_FAILURE() << "backward failed: " << s.message;
      return false;
    }
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_TRUE(ws.canary_intact()) << "backward wrote past its workspace";
  }
  CUDA_CHECK(cudaGetLastError());
  download(c, o, out);
  return true;
}

// The CUDA path rounds dZ into the input dtype before the dx / dW GEMMs (as PyTorch's own 16-bit
// path does), then rounds the result: two roundings where the CPU backend has one.
Tolerance cuda_tolerance(DType dtype) {
  Tolerance t = tolerance_for(dtype);
  if (dtype != DType::kFloat32) t.grad *= 2.0;
  return t;
}

std::vector<double> as_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

void expect_scalar(const std::string& what, double got, double ref, double rtol) {
  EXPECT_TRUE(std::isfinite(got)) << what << " = " << got << " is not finite";
  EXPECT_NEAR(got, ref, rtol * std::max(1.0, std::abs(ref))) << what;
}

// Every output against the float64 reference, with cuda_tolerance().
void expect_cuda_matches_reference(const Case& c, const Inputs& in, const Outputs& out) {
  const Tolerance tol = cuda_tolerance(c.dtype);
  const RefForward f = reference_forward(in.ref);
  if (c.options.reduction == Reduction::kNone) {
    for (int64_t i = 0; i < c.n; ++i) {
      expect_scalar("loss[" + std::to_string(i) + "]", out.loss[i], f.row_loss[i], tol.loss);
      if (in.ref.labels[i] == c.options.ignore_index) {
        EXPECT_EQ(out.loss[i], 0.0f) << "ignored row " << i;
      }
    }
  } else {
    expect_scalar("loss", out.loss[0], f.loss, tol.loss);
  }
  for (int64_t i = 0; i < c.n; ++i) {
    expect_scalar("lse[" + std::to_string(i) + "]", out.lse[i], f.lse[i], tol.loss);
  }
  if (c.metrics) {
    const double valid = f.metrics[kMetricValidTokens];
    EXPECT_EQ(out.metrics[kMetricValidTokens], valid);
    expect_scalar("max_logit", out.metrics[kMetricMaxLogit], f.metrics[kMetricMaxLogit], tol.loss);
    expect_scalar("logit_norm", out.metrics[kMetricLogitNorm], f.metrics[kMetricLogitNorm],
                  tol.loss);
    expect_scalar("entropy", out.metrics[kMetricEntropy], f.metrics[kMetricEntropy], 10 * tol.loss);
    expect_scalar("lse_squared", out.metrics[kMetricLseSquared], f.metrics[kMetricLseSquared],
                  tol.loss);
    EXPECT_NEAR(out.metrics[kMetricAccuracy], f.metrics[kMetricAccuracy],
                valid > 0 ? 1.01 / valid : 0.0);  // one near tie may flip an argmax
  }
  if (!out.has_grads) return;
  RefUpstream up = in.up;
  if (out.plan.strategy == Strategy::kGradInForward) {
    up.grad_loss = {1.0};
    up.grad_lse.clear();
  }
  const RefGrads g = reference_backward(in.ref, up);
  if (c.grad_x) expect_close("dx", out.dx.to_double(), g.dx, tol.grad);
  if (c.grad_weight) expect_close("dW", out.dw.to_double(), g.dw, tol.grad);
  if (c.grad_bias && c.bias) expect_close("db", out.db.to_double(), g.db, tol.grad);
}

// The same call on the CPU backend: both backends agree within the tolerances.
void expect_matches_cpu(const Case& c, const Inputs& in, const PlanChoice& choice,
                        const Outputs& gpu) {
  Outputs cpu;
  ASSERT_TRUE(run_fused(c, in, choice, &cpu));
  const Tolerance tol = cuda_tolerance(c.dtype);
  const int64_t rows = std::max<int64_t>(c.n, 1);
  const std::vector<double> got_lse(gpu.lse.begin(), gpu.lse.begin() + rows);
  const std::vector<double> cpu_lse(cpu.lse.begin(), cpu.lse.begin() + rows);
  if (c.n > 0) {
    expect_close("loss vs cpu", as_double(gpu.loss), as_double(cpu.loss), tol.loss);
    expect_close("lse vs cpu", got_lse, cpu_lse, tol.loss);
  }
  if (!gpu.has_grads) return;
  if (c.grad_x) expect_close("dx vs cpu", gpu.dx.to_double(), cpu.dx.to_double(), tol.grad);
  if (c.grad_weight) expect_close("dW vs cpu", gpu.dw.to_double(), cpu.dw.to_double(), tol.grad);
  if (c.grad_bias && c.bias) {
    expect_close("db vs cpu", gpu.db.to_double(), cpu.db.to_double(), tol.grad);
  }
}

const char* strategy_name(Strategy s) {
  return s == Strategy::kGradInForward ? "gif" : s == Strategy::kRecompute ? "recompute" : "auto";
}

// --- The fused API over dtypes, options, strategies and hand-made chunkings -----------------

struct CudaParam {
  std::string name;
  Case c;
  PlanChoice choice;
};
void PrintTo(const CudaParam& p, std::ostream* os) { *os << p.name; }

void all_options(Case& c) {
  c.options.ignore_index = 9;
  c.options.label_smoothing = 0.05f;
  c.options.z_loss = 1e-3f;
  c.options.softcap = 6.0f;
  c.options.logit_scale = -0.8f;
  c.bias = true;
  c.grad_bias = true;
  c.class_weights = true;
  c.int32_labels = true;
  c.x_pad = 3;
}

// The options the fused logits GEMMs serve themselves (16-bit inputs with aligned rows, compute
// capability 9.0): everything but bias, soft-capping, metrics and class-weighted smoothing.
void fusable_options(Case& c) {
  c.options.ignore_index = 9;
  c.options.label_smoothing = 0.05f;
  c.options.z_loss = 1e-3f;
  c.options.logit_scale = -0.8f;
  c.int32_labels = true;
  c.metrics = false;
  c.x_pad = 8;
}

std::vector<CudaParam> cuda_params() {
  std::vector<CudaParam> out;
  uint64_t seed = 900;
  // v = 211 takes the scalar paths of the row kernels (rows not 16-byte aligned); v = 200 (a
  // multiple of 8 but not of 64) the vectorized ones.
  // "tiles" (16-bit, aligned x rows) runs the fused logits GEMMs on compute capability 9.0:
  // several CTA tiles of 128 x 256 in both directions, each with a partial last one.
  struct Shape {
    const char* name;
    int64_t n, v, d;
    bool aligned_rows;  // x row stride a multiple of 8 even with all options
  };
  const Shape shapes[] = {
      {"odd", 77, 211, 39, false},
      {"vec", 77, 200, 40, false},
      {"tiles", 300, 1000, 64, true},
      {"tiles_odd_v", 131, 1003, 64, true}};  // rows of 16-bit blocks end off a 16-byte boundary
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (const Shape& sh : shapes) {
      const std::string dn = std::string(dtype_name(t)) + "_" + sh.name;
      auto base = [&]() {
        Case c;
        c.n = sh.n;
        c.v = sh.v;
        c.d = sh.d;
        c.dtype = t;
        c.seed = ++seed;
        return c;
      };
      auto all_options = [&](Case& c) {
        flce::test::all_options(c);
        if (sh.aligned_rows) c.x_pad = 8;
      };
      for (Strategy s : {Strategy::kGradInForward, Strategy::kRecompute}) {
        CudaParam p;
        p.c = base();
        p.choice.strategy = s;
        p.name = dn + "_" + strategy_name(s) + "_plain";
        out.push_back(p);
        p.c = base();
        all_options(p.c);
        p.c.options.reduction = Reduction::kSum;
        p.name = dn + "_" + strategy_name(s) + "_all_options_sum";
        out.push_back(p);
      }
      CudaParam p;
      p.c = base();
      all_options(p.c);
      p.c.options.reduction = Reduction::kNone;
      p.c.grad_lse = true;
      p.choice.strategy = Strategy::kRecompute;
      p.name = dn + "_recompute_all_options_none_grad_lse";
      out.push_back(p);

      // Hand-made chunkings: every branch of the driver on this backend.
      p.c = base();
      all_options(p.c);
      p.choice = PlanChoice();
      p.choice.manual = true;
      p.choice.plan.strategy = Strategy::kGradInForward;
      p.choice.plan.forward_token_chunk = 16;
      p.choice.plan.dw_group_tokens = 16;  // dZ in place, fp32 dW accumulator
      p.name = dn + "_gif_in_place_chunks";
      out.push_back(p);
      p.choice.plan.dw_group_tokens = sh.n;  // dZ of all tokens kept, one dW GEMM
      p.name = dn + "_gif_group_all_tokens";
      out.push_back(p);
      p.choice.plan = Plan();
      p.choice.plan.strategy = Strategy::kRecompute;
      p.choice.plan.forward_token_chunk = 19;
      p.choice.plan.backward_token_chunk = 16;  // several token and vocabulary blocks
      p.choice.plan.backward_vocab_chunk = 40;
      p.name = dn + "_recompute_token_and_vocab_chunks";
      out.push_back(p);
      p.choice.plan.backward_token_chunk = sh.n;  // one token block: dZ in place
      p.name = dn + "_recompute_vocab_chunks";
      out.push_back(p);
      p.choice.plan.backward_order = BackwardOrder::kTokenOuter;  // dW accumulated over 5 chunks
      p.choice.plan.backward_token_chunk = 16;
      p.choice.plan.backward_vocab_chunk = 40;
      p.choice.plan.forward_vocab_chunk = 24;  // forward rows split into vocabulary blocks
      p.name = dn + "_token_outer_split_forward";
      out.push_back(p);
      if (!sh.aligned_rows) continue;
      // The fused logits GEMMs' own options, through every strategy and chunking above, then
      // the same without them.
      for (bool fused : {true, false}) {
        const std::string suffix = fused ? "_fusable" : "_fusable_unfused";
        for (Strategy s : {Strategy::kGradInForward, Strategy::kRecompute}) {
          p = CudaParam();
          p.c = base();
          fusable_options(p.c);
          p.c.options.reduction = s == Strategy::kRecompute ? Reduction::kNone : Reduction::kSum;
          p.c.grad_lse = s == Strategy::kRecompute;
          p.choice.strategy = s;
          p.choice.manual = true;
          p.choice.plan = cuda_plan(p.c, PlanChoice{s, kRoomyBudget, false, Plan()});
          // Always: the test blocks are far below the size where dZ is fused by default.
          p.choice.plan.fused_logits = fused ? FusedLogits::kAlways : FusedLogits::kOff;
          p.name = dn + "_" + strategy_name(s) + suffix;
          out.push_back(p);
        }
        p = CudaParam();
        p.c = base();
        fusable_options(p.c);
        p.choice.manual = true;
        p.choice.plan.strategy = Strategy::kRecompute;
        p.choice.plan.fused_logits = fused ? FusedLogits::kAlways : FusedLogits::kOff;
        p.choice.plan.forward_token_chunk = 150;
        p.choice.plan.forward_vocab_chunk = 600;  // two vocabulary blocks per row, one partial
        p.choice.plan.backward_token_chunk = 200;
        p.choice.plan.backward_vocab_chunk = 700;
        p.name = dn + "_recompute_chunks" + suffix;
        out.push_back(p);
        p.choice.plan.backward_order = BackwardOrder::kTokenOuter;
        p.name = dn + "_token_outer_chunks" + suffix;
        out.push_back(p);
        // Compact blocks (partial statistics, dZ only): written by the fused GEMMs, or
        // (fused_logits off) the unfused path on narrower vocabulary blocks in the same bytes.
        p.choice.plan.compact_backward_blocks = true;
        p.choice.plan.compact_forward_blocks = true;
        p.name = dn + "_token_outer_compact" + suffix;
        out.push_back(p);
        p.choice.plan.backward_order = BackwardOrder::kVocabOuter;
        p.name = dn + "_recompute_compact" + suffix;  // dZ gathered over token blocks
        out.push_back(p);
        p.choice.plan.backward_token_chunk = sh.n;  // one token block, in place
        p.choice.plan.backward_vocab_chunk = sh.v;  // one vocabulary chunk (two when unfused)
        p.choice.plan.forward_vocab_chunk = 0;      // whole forward rows
        p.name = dn + "_recompute_compact_one_block" + suffix;
        out.push_back(p);
        // Grad-in-forward compact blocks (fp16 terms exp(z - tile max) turned into dZ), or
        // (fused_logits off) fp32 blocks of fewer whole rows in the same bytes.
        p.choice.plan = Plan();
        p.choice.plan.strategy = Strategy::kGradInForward;
        p.choice.plan.fused_logits = fused ? FusedLogits::kAlways : FusedLogits::kOff;
        p.choice.plan.compact_forward_blocks = true;
        p.choice.plan.forward_token_chunk = 50;
        p.choice.plan.dw_group_tokens = 50;  // dZ in place over the terms, dW accumulated
        p.name = dn + "_gif_compact_in_place" + suffix;
        out.push_back(p);
        p.choice.plan.dw_group_tokens = sh.n;  // dZ of all tokens kept, one dW GEMM
        p.name = dn + "_gif_compact_group" + suffix;
        out.push_back(p);
      }
    }
  }
  return out;
}

class CudaFused : public ::testing::TestWithParam<CudaParam> {};

TEST_P(CudaFused, MatchesReferenceAndCpu) {
  SKIP_WITHOUT_DEVICE();
  const CudaParam& p = GetParam();
  SCOPED_TRACE(p.c.describe());
  const Inputs in = make_inputs(p.c);
  Outputs out;
  ASSERT_TRUE(run_fused_cuda(p.c, in, p.choice, &out));
  if (p.choice.strategy != Strategy::kAuto) {
    EXPECT_EQ(out.plan.strategy, p.choice.strategy);
  }
  expect_cuda_matches_reference(p.c, in, out);
  expect_matches_cpu(p.c, in, p.choice, out);
}

INSTANTIATE_TEST_SUITE_P(Cuda, CudaFused, ::testing::ValuesIn(cuda_params()),
                         [](const ::testing::TestParamInfo<CudaParam>& i) { return i.param.name; });

// Seeded random problems with hand-made plans on the GPU (Fuzz in the harness), as FusedFuzz
// does on the CPU. Half the cases are 16-bit with the fused GEMMs' own options, aligned rows and
// D a multiple of 8, and force the fused GEMMs (fused_logits always), so that on compute
// capability 9.0 they run on blocks of random shapes (several CTA tiles, partial last ones, D on
// both sides of kFusedPingpongMaxHidden); the others mix every option on the cuBLASLt + row
// kernel path.
TEST(CudaFuzz, RandomPlansMatchReference) {
  SKIP_WITHOUT_DEVICE();
  Fuzz fuzz(20261130);
  const DType dtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
  for (int iter = 0; iter < 40; ++iter) {
    Case c;
    const bool fusable = fuzz.coin(0.5);
    c.n = fuzz.uniform(1, 300);
    c.v = fuzz.uniform(2, 1100);
    if (fusable) {
      c.dtype = fuzz.coin(0.5) ? DType::kBFloat16 : DType::kFloat16;
      c.d = 8 * (fuzz.coin(0.2) ? fuzz.uniform(257, 264) : fuzz.uniform(1, 16));
      fusable_options(c);
      c.options.label_smoothing = fuzz.coin(0.5) ? 0.05f : 0.0f;
      c.options.z_loss = fuzz.coin(0.5) ? 1e-3f : 0.0f;
    } else {
      c.dtype = dtypes[fuzz.uniform(0, 2)];
      c.d = fuzz.uniform(1, 80);
      fuzz.mix_options(&c);
    }
    fuzz.mix_labels(&c);
    c.seed = 7000 + iter;
    PlanChoice choice;
    choice.manual = true;
    choice.plan = fuzz.plan_for(&c, 0.5);
    choice.plan.fused_logits = fusable ? FusedLogits::kAlways : FusedLogits::kAuto;
    SCOPED_TRACE(c.describe() + ", case " + std::to_string(iter) + ": " +
                 describe_plan(choice.plan));
    const Inputs in = make_inputs(c);
    Outputs out;
    ASSERT_TRUE(run_fused_cuda(c, in, choice, &out));
    expect_cuda_matches_reference(c, in, out);
  }
}

// --- Edge cases ------------------------------------------------------------------------------

TEST(CudaEdge, AllRowsIgnored) {
  SKIP_WITHOUT_DEVICE();
  for (Reduction r : {Reduction::kMean, Reduction::kSum, Reduction::kNone}) {
    for (Strategy s : {Strategy::kGradInForward, Strategy::kRecompute}) {
      if (r == Reduction::kNone && s == Strategy::kGradInForward) continue;
      Case c;
      c.n = 37;
      c.v = 203;
      c.d = 45;
      c.dtype = DType::kBFloat16;
      c.options.reduction = r;
      c.all_ignored = true;
      c.bias = true;
      c.grad_bias = true;
      c.class_weights = true;
      c.seed = 31;
      SCOPED_TRACE(c.describe() + " strategy " + strategy_name(s));
      const Inputs in = make_inputs(c);
      PlanChoice choice;
      choice.strategy = s;
      Outputs out;
      ASSERT_TRUE(run_fused_cuda(c, in, choice, &out));
      for (float l : out.loss) EXPECT_EQ(l, 0.0f);
      for (int m = 0; m < kNumMetrics; ++m) EXPECT_EQ(out.metrics[m], 0.0f) << "metric " << m;
      for (const TypedBuffer* g : {&out.dx, &out.dw, &out.db}) {
        for (double v : g->to_double()) ASSERT_EQ(v, 0.0);
      }
      for (int64_t i = 0; i < c.n; ++i) EXPECT_TRUE(std::isfinite(out.lse[i]));
    }
  }
}

TEST(CudaEdge, ZeroTokens) {
  SKIP_WITHOUT_DEVICE();
  for (Strategy s : {Strategy::kGradInForward, Strategy::kRecompute}) {
    for (Reduction r : {Reduction::kMean, Reduction::kSum}) {
      Case c;
      c.n = 0;
      c.v = 203;
      c.d = 45;
      c.dtype = DType::kBFloat16;
      c.bias = true;
      c.grad_bias = true;
      c.options.reduction = r;
      SCOPED_TRACE(c.describe() + " strategy " + strategy_name(s));
      const Inputs in = make_inputs(c);
      PlanChoice choice;
      choice.strategy = s;
      Outputs out;
      ASSERT_TRUE(run_fused_cuda(c, in, choice, &out));
      EXPECT_EQ(out.loss[0], 0.0f);
      for (int m = 0; m < kNumMetrics; ++m) EXPECT_EQ(out.metrics[m], 0.0f);
      for (double v : out.dw.to_double()) ASSERT_EQ(v, 0.0);
      for (double v : out.db.to_double()) ASSERT_EQ(v, 0.0);
    }
  }
}

// V > 65536: 70001 takes the scalar row paths; 69632 the vectorized ones and the wide column sum.
TEST(CudaEdge, LargeVocabulary) {
  SKIP_WITHOUT_DEVICE();
  for (int64_t v : {int64_t(70001), int64_t(69632)}) {
    for (Strategy s : {Strategy::kGradInForward, Strategy::kRecompute}) {
      Case c;
      c.n = 21;
      c.v = v;
      c.d = 24;
      c.dtype = DType::kBFloat16;
      c.bias = true;
      c.grad_bias = true;
      c.class_weights = s == Strategy::kRecompute;
      c.options.softcap = 8.0f;
      c.options.label_smoothing = 0.1f;
      c.seed = 41;
      SCOPED_TRACE(c.describe() + " strategy " + strategy_name(s));
      const Inputs in = make_inputs(c);
      PlanChoice choice;
      choice.strategy = s;
      Outputs out;
      ASSERT_TRUE(run_fused_cuda(c, in, choice, &out));
      expect_cuda_matches_reference(c, in, out);
      expect_matches_cpu(c, in, choice, out);
    }
  }
}

// The measured algorithm choice of the cuBLASLt GEMMs (cublaslt_gemm.cpp), for every GEMM: a new
// shape's first calls take turns among cuBLASLt's candidates and each still writes the whole
// product, the shape settles once its trials have been read, and a stream under graph capture
// times nothing. Then the default mode: a new shape that does not ask for it is not measured, an
// accumulating one that asks (GemmArgs::measure_algorithm) is, and every call adds the exact
// product. The operands are multiples of 1/64 and K is small enough that every
// partial sum is exact in fp32, so every candidate, in any summation order, must give the exact
// product.
TEST(CudaGemm, MeasuredAlgorithmChoice) {
  SKIP_WITHOUT_DEVICE();
  namespace cu = detail::cuda;
  struct Restore {
    cu::GemmTuning was = cu::cublaslt_tuning();
    ~Restore() { cu::set_cublaslt_tuning(was); }
  } restore;
  cu::set_cublaslt_tuning(cu::GemmTuning::kAll);
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  cu::CublasLtTuningCounts before, after;
  ASSERT_TRUE(cu::cublaslt_tuning_counts(device, &before).ok());

  auto bf16_bits = [](float f) {
    uint32_t u = 0;
    std::memcpy(&u, &f, sizeof(u));
    return static_cast<uint16_t>(u >> 16);  // exact: the values need at most 8 significant bits
  };
  auto value = [](size_t i) {
    return static_cast<float>(static_cast<int>((i * 37) % 129) - 64) / 64.0f;
  };
  const DeviceBuffer ws(cu::kCublasLtWorkspaceBytes);
  // One GEMM shape (m, n, k: none another test uses) with its operands, output and exact product.
  struct Problem {
    detail::GemmArgs g;
    DeviceBuffer a, b, c;
    std::vector<float> want;
  };
  auto make = [&](int64_t m, int64_t n, int64_t k) {
    auto p = std::make_unique<Problem>();
    std::vector<uint16_t> ha(m * k), hb(k * n);
    std::vector<double> fa(m * k), fb(k * n);
    for (size_t i = 0; i < ha.size(); ++i) ha[i] = bf16_bits(static_cast<float>(fa[i] = value(i)));
    for (size_t i = 0; i < hb.size(); ++i)
      hb[i] = bf16_bits(static_cast<float>(fb[i] = value(i + 7)));
    p->want.assign(m * n, 0.0f);
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t col = 0; col < n; ++col) {
        double acc = 0.0;
        for (int64_t j = 0; j < k; ++j) acc += fa[r * k + j] * fb[j * n + col];
        p->want[r * n + col] = static_cast<float>(acc);
      }
    }
    p->a = DeviceBuffer(ha.size() * 2);
    p->b = DeviceBuffer(hb.size() * 2);
    p->c = DeviceBuffer(p->want.size() * 4);
    p->a.upload(ha.data(), ha.size() * 2);
    p->b.upload(hb.data(), hb.size() * 2);
    p->g.m = m;
    p->g.n = n;
    p->g.k = k;
    p->g.a = p->a.get();
    p->g.lda = k;
    p->g.a_type = DType::kBFloat16;
    p->g.b = p->b.get();
    p->g.ldb = n;
    p->g.b_type = DType::kBFloat16;
    p->g.c = p->c.get();
    p->g.ldc = n;
    p->g.c_type = DType::kFloat32;
    return p;
  };
  auto expect_exact = [](const Problem& p, const std::string& what) {
    std::vector<float> got(p.want.size());
    p.c.download(got.data(), got.size() * 4);
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_EQ(got[i], p.want[i]) << what << ", element " << i;
    }
  };

  const auto p = make(515, 333, 1201);
  for (int call = 0; call < 40; ++call) {
    p->c.poison();  // NaN: beta = 0 must write every element
    ASSERT_TRUE(cu::cublaslt_gemm(p->g, nullptr, ws.get(), ws.bytes(), false).ok());
    CUDA_CHECK(cudaDeviceSynchronize());
    expect_exact(*p, "call " + std::to_string(call));
  }
  ASSERT_TRUE(cu::cublaslt_tuning_counts(device, &after).ok());
  EXPECT_EQ(after.settled, before.settled + 1);  // 8 candidates x 3 trials fit in 40 calls
  EXPECT_EQ(after.measuring, before.measuring);

  // A second new shape: one measured call, then a captured one, which runs the heuristic's
  // choice untimed (the shape is still being measured afterwards).
  const auto q = make(517, 331, 1203);
  ASSERT_TRUE(cu::cublaslt_gemm(q->g, nullptr, ws.get(), ws.bytes(), false).ok());
  cudaStream_t stream = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CUDA_CHECK(cudaDeviceSynchronize());
  q->c.poison();
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  const Status st = cu::cublaslt_gemm(q->g, stream, ws.get(), ws.bytes(), false);
  CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  ASSERT_TRUE(st.ok()) << st.message;
  CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  CUDA_CHECK(cudaGraphLaunch(exec, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  expect_exact(*q, "graph replay");
  CUDA_CHECK(cudaGraphExecDestroy(exec));
  CUDA_CHECK(cudaGraphDestroy(graph));
  CUDA_CHECK(cudaStreamDestroy(stream));
  ASSERT_TRUE(cu::cublaslt_tuning_counts(device, &after).ok());
  EXPECT_EQ(after.measuring, before.measuring + 1);

  cu::set_cublaslt_tuning(cu::GemmTuning::kRequested);
  before = after;
  const auto unasked = make(519, 329, 1205);
  ASSERT_TRUE(cu::cublaslt_gemm(unasked->g, nullptr, ws.get(), ws.bytes(), false).ok());
  CUDA_CHECK(cudaDeviceSynchronize());
  expect_exact(*unasked, "a GEMM that does not ask to be measured");
  ASSERT_TRUE(cu::cublaslt_tuning_counts(device, &after).ok());
  EXPECT_EQ(after.measuring, before.measuring) << "a GEMM that did not ask was measured";
  EXPECT_EQ(after.settled, before.settled);

  // C = start + A B, from the same exact start every call (multiples of 1/64 below 2). A short K
  // and aligned rows, like the dW GEMMs that ask: at 1031 x 517 x 136 the heuristic offered no
  // two candidates that keep K whole, so nothing was measured.
  const auto acc = make(4096, 512, 64);
  acc->g.beta = 1.0f;
  acc->g.measure_algorithm = true;
  std::vector<float> start(acc->want.size());
  for (size_t i = 0; i < start.size(); ++i) {
    start[i] = value(i + 3) + 1.0f;
    acc->want[i] += start[i];
  }
  for (int call = 0; call < 40; ++call) {
    acc->c.upload(start.data(), start.size() * 4);
    ASSERT_TRUE(cu::cublaslt_gemm(acc->g, nullptr, ws.get(), ws.bytes(), false).ok());
    CUDA_CHECK(cudaDeviceSynchronize());
    expect_exact(*acc, "accumulating call " + std::to_string(call));
  }
  ASSERT_TRUE(cu::cublaslt_tuning_counts(device, &after).ok());
  EXPECT_EQ(after.settled, before.settled + 1) << "the accumulating GEMM was not measured";
  EXPECT_EQ(after.measuring, before.measuring);
}

// GEMMs whose alpha and beta live in device memory (GemmArgs::device_alpha / device_beta: the
// dW GEMM of one group of row-shifted terms takes the mean's 1 / denominator this way). The
// operands are multiples of 1/64 and every partial sum is exact in fp32, so the products are
// exact. Captured in a graph, the call must read the scalars when it runs: the replay after they
// change gives the new product. Half a pair is refused.
TEST(CudaGemm, DeviceScalars) {
  SKIP_WITHOUT_DEVICE();
  namespace cu = detail::cuda;
  const int64_t m = 300, n = 200, k = 96;
  auto value = [](size_t i) {
    return static_cast<float>(static_cast<int>((i * 29) % 127) - 63) / 64.0f;
  };
  auto bf16_bits = [](float f) {
    uint32_t u = 0;
    std::memcpy(&u, &f, sizeof(u));
    return static_cast<uint16_t>(u >> 16);  // exact: at most 8 significant bits
  };
  std::vector<uint16_t> ha(m * k), hb(k * n);
  std::vector<double> product(m * n, 0.0);
  for (size_t i = 0; i < ha.size(); ++i) ha[i] = bf16_bits(value(i));
  for (size_t i = 0; i < hb.size(); ++i) hb[i] = bf16_bits(value(i + 11));
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t j = 0; j < k; ++j) {
      for (int64_t col = 0; col < n; ++col)
        product[r * n + col] += value(r * k + j) * value(j * n + col + 11);
    }
  }
  const DeviceBuffer a = to_device(ha), b = to_device(hb), c(m * n * sizeof(float));
  const DeviceBuffer ws(cu::kCublasLtWorkspaceBytes), scalars(2 * sizeof(float));
  detail::GemmArgs g;
  g.m = m;
  g.n = n;
  g.k = k;
  g.a = a.get();
  g.lda = k;
  g.a_type = DType::kBFloat16;
  g.b = b.get();
  g.ldb = n;
  g.b_type = DType::kBFloat16;
  g.c = c.get();
  g.ldc = n;
  g.c_type = DType::kFloat32;
  g.alpha = 3.0f;  // ignored: the device's scalars rule
  g.beta = 5.0f;
  g.device_alpha = static_cast<const float*>(scalars.get());
  g.device_beta = g.device_alpha + 1;
  auto set_scalars = [&](float alpha, float beta) {
    const float host[2] = {alpha, beta};
    scalars.upload(host, sizeof(host));
  };
  auto expect_product = [&](double alpha, const std::vector<float>& start, double beta,
                            const std::string& what) {
    std::vector<float> got(m * n);
    c.download(got.data(), got.size() * sizeof(float));
    for (size_t i = 0; i < got.size(); ++i) {
      const double want = alpha * product[i] + (beta != 0.0 ? beta * start[i] : 0.0);
      ASSERT_EQ(got[i], static_cast<float>(want)) << what << ", element " << i;
    }
  };

  set_scalars(0.25f, 0.0f);
  c.poison();  // NaN: a device beta of 0 must ignore C
  ASSERT_TRUE(cu::cublaslt_gemm(g, nullptr, ws.get(), ws.bytes(), false).ok());
  CUDA_CHECK(cudaDeviceSynchronize());
  expect_product(0.25, {}, 0.0, "alpha 0.25, beta 0");

  std::vector<float> start(m * n);
  for (size_t i = 0; i < start.size(); ++i) start[i] = value(i + 5);
  cudaStream_t stream = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  const Status st = cu::cublaslt_gemm(g, stream, ws.get(), ws.bytes(), false);
  CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  ASSERT_TRUE(st.ok()) << st.message;
  CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (auto [alpha, beta] : {std::pair{-0.5f, 1.0f}, std::pair{2.0f, -0.25f}}) {
    set_scalars(alpha, beta);
    c.upload(start.data(), start.size() * sizeof(float));
    CUDA_CHECK(cudaGraphLaunch(exec, stream));
    CUDA_CHECK(cudaStreamSynchronize(stream));
    expect_product(alpha, start, beta, "graph replay, alpha " + std::to_string(alpha));
  }
  CUDA_CHECK(cudaGraphExecDestroy(exec));
  CUDA_CHECK(cudaGraphDestroy(graph));
  CUDA_CHECK(cudaStreamDestroy(stream));

  detail::GemmArgs half = g;
  half.device_beta = nullptr;
  const Status refused = cu::cublaslt_gemm(half, nullptr, ws.get(), ws.bytes(), false);
  EXPECT_EQ(refused.code, StatusCode::kInvalidArgument);
  EXPECT_NE(refused.message.find("device_alpha and device_beta"), std::string::npos)
      << refused.message;
}

// A hand-made grad-in-forward plan on compact blocks, always through the fused GEMMs: token chunks
// of `chunk` rows, dZ (or the terms) of `group` tokens per dW GEMM, row-shifted terms or not.
PlanChoice compact_gif_choice(int64_t chunk, int64_t group, bool shifted) {
  PlanChoice choice;
  choice.strategy = Strategy::kGradInForward;
  choice.manual = true;
  choice.plan.strategy = Strategy::kGradInForward;
  choice.plan.fused_logits = FusedLogits::kAlways;
  choice.plan.compact_forward_blocks = true;
  choice.plan.shifted_terms = shifted;
  choice.plan.forward_token_chunk = chunk;
  choice.plan.dw_group_tokens = group;
  return choice;
}

// Grad-in-forward compact blocks whose rows span several rounds of the pass that turns the fp16
// terms into dZ (each thread loads 4 groups of 8 columns per round of 8192 columns, then takes
// the rest of the row one group at a time): V = 20000 (2 rounds, then 3616 columns) and 20003 (a
// last group of 3 columns); dZ in place per 48-row chunk with dW accumulated, or dZ of all tokens
// kept.
TEST(CudaEdge, GradInForwardTermsOnWideRows) {
  SKIP_WITHOUT_DEVICE();
  for (int64_t v : {int64_t(20000), int64_t(20003)}) {
    for (DType t : {DType::kBFloat16, DType::kFloat16}) {
      for (int64_t group : {int64_t(48), int64_t(70)}) {
        Case c;
        c.n = 70;
        c.v = v;
        c.d = 64;
        c.dtype = t;
        fusable_options(c);
        c.options.reduction = Reduction::kSum;
        c.seed = 77 + v + group;
        SCOPED_TRACE(c.describe() + " dw_group_tokens " + std::to_string(group));
        const Inputs in = make_inputs(c);
        const PlanChoice choice = compact_gif_choice(48, group, /*shifted=*/false);
        Outputs out;
        ASSERT_TRUE(run_fused_cuda(c, in, choice, &out));
        expect_cuda_matches_reference(c, in, out);
      }
    }
  }
}

// Grad-in-forward with row-shifted terms (Plan::shifted_terms) against float64, with rows of
// every kind: kept (most), rewritten because their label lies far below the row's max (x along
// another class's weight: a tile overflows fp16 under the label's shift), rewritten because
// fp16(factor * x) would overflow (one |x| of 1e5 against a zero column of W), and ignored. bf16
// and fp16; mean and sum; plain options, then z-loss with a negative logit scale (negative row
// factors); V not a multiple of 8, and V > 65536; dW accumulated in fp32 per 48-row chunk, or one
// dW GEMM over the terms of every token (its upstream factor read on the device). Every dx row of
// the shifted path is checked on its own, since the large row dominates the norms. The same plan
// without shifted terms is run too: both match the reference, and they must differ in some
// element of dx and of dW, which shows that the shifted path ran.
TEST(CudaEdge, GradInForwardShiftedTerms) {
  SKIP_WITHOUT_DEVICE();
  // Row-shifted terms come from the fused statistics GEMM, which runs on compute capability 9.0
  // in builds with CUTLASS only; elsewhere the plan's compact blocks fall back and nothing here
  // would differ.
  int device = 0, major = 0, minor = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (!(FLCE_WITH_CUTLASS && major == 9 && minor == 0)) {
    GTEST_SKIP() << "no fused logits GEMMs on this build or device";
  }
  struct Shape {
    int64_t n, v, d;
  };
  uint64_t seed = 4100;
  for (Shape sh : {Shape{130, 2003, 72}, Shape{70, 70001, 64}}) {
    for (DType t : {DType::kBFloat16, DType::kFloat16}) {
      for (Reduction red : {Reduction::kMean, Reduction::kSum}) {
        for (bool options : {false, true}) {
          Case c;
          c.n = sh.n;
          c.v = sh.v;
          c.d = sh.d;
          c.dtype = t;
          c.options.ignore_index = 9;
          c.options.reduction = red;
          if (options) {
            c.options.z_loss = 1e-3f;
            c.options.logit_scale = -0.8f;
          }
          c.int32_labels = true;
          c.metrics = false;
          c.x_pad = 8;
          c.seed = ++seed;
          SCOPED_TRACE(c.describe());
          Inputs in = make_inputs(c);
          const double scale = c.options.logit_scale;
          auto set_x = [&](int64_t i, int64_t k, double value) {
            in.x.set(i * in.x_stride + k, value);
            in.ref.x[i * c.d + k] = in.x.get(i * in.x_stride + k);
          };
          // Peaked rows 2, 5, 8: x = a W[j] with z_j = 30, j != label.
          for (int64_t i : {int64_t(2), int64_t(5), int64_t(8)}) {
            const int64_t y = in.ref.labels[i] == c.options.ignore_index ? 0 : in.ref.labels[i];
            in.ref.labels[i] = y;
            in.labels32[i] = static_cast<int32_t>(y);
            const int64_t j = (y + 1 + i) % c.v;
            double norm2 = 0.0;
            for (int64_t k = 0; k < c.d; ++k)
              norm2 += in.ref.weight[j * c.d + k] * in.ref.weight[j * c.d + k];
            const double a = 30.0 / (scale * norm2);
            for (int64_t k = 0; k < c.d; ++k) set_x(i, k, a * in.ref.weight[j * c.d + k]);
          }
          // Row 3: x = a W[label] (z_label = 10, a likely label), plus x[0] = 1e5 (bf16 holds it,
          // fp16 does not: 6e4 there) where column 0 of W is zero, so that the logits stay
          // moderate but fp16(factor * x) would overflow.
          {
            const int64_t i = 3;
            const int64_t y = in.ref.labels[i] == c.options.ignore_index ? 0 : in.ref.labels[i];
            in.ref.labels[i] = y;
            in.labels32[i] = static_cast<int32_t>(y);
            for (int64_t j = 0; j < c.v; ++j) {
              in.weight.set(j * c.d, 0.0);
              in.ref.weight[j * c.d] = 0.0;
            }
            double norm2 = 0.0;
            for (int64_t k = 0; k < c.d; ++k)
              norm2 += in.ref.weight[y * c.d + k] * in.ref.weight[y * c.d + k];
            const double a = 10.0 / (scale * norm2);
            for (int64_t k = 0; k < c.d; ++k) set_x(i, k, a * in.ref.weight[y * c.d + k]);
            set_x(i, 0, t == DType::kFloat16 ? 6e4 : 1e5);
          }
          const RefGrads ref = [&] {
            RefUpstream up = in.up;
            up.grad_loss = {1.0};
            up.grad_lse.clear();
            return reference_backward(in.ref, up);
          }();

          // 48-row chunks (two or three), dW accumulated in fp32 per chunk or one dW GEMM over
          // the terms of every token.
          for (int64_t group : {int64_t(48), c.n}) {
            SCOPED_TRACE("dw_group_tokens " + std::to_string(group));
            Outputs outs[2];
            for (bool shifted : {true, false}) {
              const PlanChoice choice = compact_gif_choice(48, group, shifted);
              SCOPED_TRACE(shifted ? "shifted terms" : "terms under each tile's max");
              Outputs& out = outs[shifted ? 0 : 1];
              ASSERT_TRUE(run_fused_cuda(c, in, choice, &out));
              expect_cuda_matches_reference(c, in, out);
              // Row by row for the shifted terms only: with fp16 inputs the unshifted path rounds
              // dZ (g folded in) to fp16, whose subnormals cost a wide row of small p its last
              // bits (row 3 at V = 70001: 2.05e-3).
              if (!shifted) continue;
              const Tolerance tol = cuda_tolerance(c.dtype);
              const std::vector<double> dx = out.dx.to_double();
              for (int64_t i = 0; i < c.n; ++i) {
                const std::vector<double> got(dx.begin() + i * c.d, dx.begin() + (i + 1) * c.d);
                const std::vector<double> want(ref.dx.begin() + i * c.d,
                                               ref.dx.begin() + (i + 1) * c.d);
                double want_max = 0.0;
                for (double w : want) want_max = std::max(want_max, std::abs(w));
                if (want_max == 0.0) continue;  // ignored rows: expect_close above saw zeros
                SCOPED_TRACE("dx row " + std::to_string(i));
                expect_close("dx row", got, want, tol.grad);
              }
            }
            const std::vector<double> a = outs[0].dx.to_double(), b = outs[1].dx.to_double();
            EXPECT_NE(a, b) << "shifted terms gave bit-identical dx: did the shifted path run?";
            const std::vector<double> wa = outs[0].dw.to_double(), wb = outs[1].dw.to_double();
            EXPECT_NE(wa, wb) << "shifted terms gave bit-identical dW: did the shifted path run?";
          }
        }
      }
    }
  }
}

// Rows far longer than one tile of the row kernels (100000 columns: a partial last tile; 262144
// and 262148), with every option and metrics, then plain without metrics (the kernels skip the
// metric sums): the statistics merged across tiles and threads against float64.
TEST(CudaEdge, LongRowsWithAndWithoutMetrics) {
  SKIP_WITHOUT_DEVICE();
  uint64_t seed = 500;
  for (int64_t v : {int64_t(100000), int64_t(262144), int64_t(262148)}) {
    for (DType t : {DType::kFloat32, DType::kBFloat16}) {
      for (Strategy s : {Strategy::kGradInForward, Strategy::kRecompute}) {
        // Every option with metrics (the full statistics), then plain without metrics (only
        // the max and the sum of exponentials).
        for (bool plain : {false, true}) {
          Case c;
          c.n = 9;
          c.v = v;
          c.d = 16;
          c.dtype = t;
          c.seed = ++seed;
          if (!plain) all_options(c);
          c.metrics = !plain;
          SCOPED_TRACE(c.describe() + " strategy " + strategy_name(s) +
                       (plain ? " plain, no metrics" : " all options"));
          const Inputs in = make_inputs(c);
          PlanChoice choice;
          choice.strategy = s;
          Outputs out;
          ASSERT_TRUE(run_fused_cuda(c, in, choice, &out));
          expect_cuda_matches_reference(c, in, out);
        }
      }
    }
  }
}

// A label neither ignore_index nor in [0, V) cannot be reported synchronously: its loss is NaN.
TEST(CudaEdge, OutOfRangeLabelGivesNan) {
  SKIP_WITHOUT_DEVICE();
  for (Reduction r : {Reduction::kMean, Reduction::kNone}) {
    for (int64_t bad : {int64_t(203), int64_t(-3)}) {
      Case c;
      c.n = 37;
      c.v = 203;
      c.d = 45;
      c.options.reduction = r;
      c.grad_x = c.grad_weight = false;
      c.seed = 51;
      Inputs in = make_inputs(c);
      in.labels64[5] = bad;
      PlanChoice choice;
      choice.strategy = Strategy::kRecompute;
      Outputs out;
      ASSERT_TRUE(run_fused_cuda(c, in, choice, &out));
      if (r == Reduction::kMean) {
        EXPECT_TRUE(std::isnan(out.loss[0])) << "loss " << out.loss[0];
      } else {
        for (int64_t i = 0; i < c.n; ++i) {
          if (i == 5) {
            EXPECT_TRUE(std::isnan(out.loss[i])) << "label " << bad;
          } else {
            EXPECT_TRUE(std::isfinite(out.loss[i])) << "row " << i;
          }
        }
      }
    }
  }
}

// --- cross_entropy_logits --------------------------------------------------------------------

struct LogitsParam {
  std::string name;
  Case c;  // n, v, dtype, options, class_weights, int32_labels, grad_lse (d is ignored)
  int64_t pad = 0;
  bool in_place = false;
};
void PrintTo(const LogitsParam& p, std::ostream* os) { *os << p.name; }

std::vector<LogitsParam> logits_params() {
  std::vector<LogitsParam> out;
  uint64_t seed = 950;
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (Reduction r : {Reduction::kMean, Reduction::kSum, Reduction::kNone}) {
      const std::string rn = r == Reduction::kMean ? "mean" : r == Reduction::kSum ? "sum" : "none";
      LogitsParam l;
      l.c.n = 29;
      l.c.v = 160;  // rows 16-byte aligned: vectorized
      l.c.dtype = t;
      l.c.options.reduction = r;
      l.c.seed = ++seed;
      l.name = std::string(dtype_name(t)) + "_" + rn;
      out.push_back(l);
      l.c.v = 157;  // scalar path
      l.c.seed = ++seed;
      l.c.options.label_smoothing = 0.1f;
      l.c.options.z_loss = 1e-3f;
      l.c.options.softcap = 5.0f;
      l.c.options.logit_scale = -0.7f;
      l.c.options.ignore_index = 2;
      l.c.class_weights = true;
      l.c.int32_labels = true;
      l.c.grad_lse = true;
      l.pad = 6;
      l.in_place = true;
      l.name += "_all_options_in_place";
      out.push_back(l);
      l.c.v = 160;  // vectorized and in place
      l.pad = 8;
      l.c.seed = ++seed;
      l.name += "_vec";
      out.push_back(l);
    }
  }
  return out;
}

class CudaLogits : public ::testing::TestWithParam<LogitsParam> {};

// The reference takes x W^T, so the logits are fed as x with W = I: its dx is dL/dlogits.
TEST_P(CudaLogits, MatchesReference) {
  SKIP_WITHOUT_DEVICE();
  const LogitsParam& p = GetParam();
  Case c = p.c;
  c.d = c.v;
  SCOPED_TRACE(c.describe());
  const Inputs in = make_inputs(c);
  const int64_t n = c.n, v = c.v, ld = v + p.pad;
  TypedBuffer logits(c.dtype, n * ld);
  logits.poison();
  RefProblem ref = in.ref;
  ref.weight.assign(v * v, 0.0);
  for (int64_t j = 0; j < v; ++j) ref.weight[j * v + j] = 1.0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < v; ++j) logits.set(i * ld + j, 2.5 * ref.x[i * v + j]);
    for (int64_t j = 0; j < v; ++j) ref.x[i * v + j] = logits.get(i * ld + j);
  }
  const std::vector<float> scale =
      c.options.reduction == Reduction::kNone ? in.grad_loss : std::vector<float>{0.6f};

  const DeviceBuffer d_logits = to_device(logits);
  const DeviceBuffer d_labels = c.int32_labels ? to_device(in.labels32) : to_device(in.labels64);
  const DeviceBuffer d_cw = c.class_weights ? to_device(in.class_weight) : DeviceBuffer();
  const DeviceBuffer d_scale = to_device(scale);
  const DeviceBuffer d_glse = c.grad_lse ? to_device(in.grad_lse) : DeviceBuffer();
  const DeviceBuffer loss(sizeof(float) * (c.options.reduction == Reduction::kNone ? n : 1));
  const DeviceBuffer lse(sizeof(float) * n), metrics(sizeof(float) * kNumMetrics);
  const DeviceBuffer grad(logits.size() * dtype_size(c.dtype));
  const DeviceBuffer ws(logits_workspace_bytes(n));

  LogitsParams lp;
  lp.logits = d_logits.raw();
  lp.logits_row_stride = ld;
  lp.labels = d_labels.raw();
  lp.label_type = in.label_type();
  lp.class_weight = static_cast<const float*>(d_cw.get());
  lp.num_tokens = n;
  lp.vocab_size = v;
  lp.dtype = c.dtype;
  lp.options = c.options;
  lp.loss = static_cast<float*>(loss.raw());
  lp.lse = static_cast<float*>(lse.raw());
  lp.metrics = static_cast<float*>(metrics.raw());
  lp.grad_logits = p.in_place ? d_logits.raw() : grad.raw();
  lp.grad_row_stride = ld;
  lp.grad_scale = static_cast<const float*>(d_scale.raw());
  lp.grad_lse = static_cast<const float*>(d_glse.get());
  lp.workspace = ws.get();
  lp.workspace_bytes = ws.bytes();
  const Status s = cross_entropy_logits(Device::kCuda, lp);
  ASSERT_TRUE(s.ok()) << s.message;
  CUDA_CHECK(cudaDeviceSynchronize());
  for (const DeviceBuffer* b : {&d_logits, &loss, &lse, &metrics, &grad, &ws}) {
    EXPECT_TRUE(b->canary_intact());
  }

  std::vector<float> h_loss(loss.bytes() / sizeof(float)), h_lse(n), h_metrics(kNumMetrics);
  loss.download(h_loss.data(), loss.bytes());
  lse.download(h_lse.data(), lse.bytes());
  metrics.download(h_metrics.data(), metrics.bytes());
  TypedBuffer got(c.dtype, n * ld);
  (p.in_place ? d_logits : grad).download(got.data(), grad.bytes());

  const RefForward f = reference_forward(ref);
  const Tolerance tol = cuda_tolerance(c.dtype);
  if (c.options.reduction == Reduction::kNone) {
    for (int64_t i = 0; i < n; ++i) {
      expect_scalar("loss[" + std::to_string(i) + "]", h_loss[i], f.row_loss[i], tol.loss);
    }
  } else {
    expect_scalar("loss", h_loss[0], f.loss, tol.loss);
  }
  for (int64_t i = 0; i < n; ++i) {
    expect_scalar("lse[" + std::to_string(i) + "]", h_lse[i], f.lse[i], tol.loss);
  }
  EXPECT_EQ(h_metrics[kMetricValidTokens], f.metrics[kMetricValidTokens]);
  expect_scalar("max_logit", h_metrics[kMetricMaxLogit], f.metrics[kMetricMaxLogit], tol.loss);
  expect_scalar("entropy", h_metrics[kMetricEntropy], f.metrics[kMetricEntropy], 10 * tol.loss);

  RefUpstream up;
  up.grad_loss.assign(scale.begin(), scale.end());
  if (c.grad_lse) up.grad_lse.assign(in.grad_lse.begin(), in.grad_lse.end());
  const RefGrads g = reference_backward(ref, up);
  std::vector<double> dense(n * v);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < v; ++j) dense[i * v + j] = got.get(i * ld + j);
    for (int64_t j = v; j < ld; ++j) {
      EXPECT_TRUE(std::isnan(got.get(i * ld + j))) << "padding written at row " << i;
    }
  }
  // dZ is rounded once into the dtype here, as on the CPU.
  expect_close("grad_logits", dense, g.dx, tolerance_for(c.dtype).grad);
}

INSTANTIATE_TEST_SUITE_P(Cuda, CudaLogits, ::testing::ValuesIn(logits_params()),
                         [](const ::testing::TestParamInfo<LogitsParam>& i) {
                           return i.param.name;
                         });

TEST(CudaLogitsEdge, ZeroTokens) {
  SKIP_WITHOUT_DEVICE();
  const DeviceBuffer labels(sizeof(int64_t)), loss(sizeof(float)),
      metrics(sizeof(float) * kNumMetrics), ws(logits_workspace_bytes(0));
  LogitsParams lp;
  lp.labels = labels.raw();
  lp.num_tokens = 0;
  lp.vocab_size = 10;
  lp.logits_row_stride = 10;
  lp.loss = static_cast<float*>(loss.raw());
  lp.metrics = static_cast<float*>(metrics.raw());
  lp.workspace = ws.get();
  lp.workspace_bytes = ws.bytes();
  ASSERT_TRUE(cross_entropy_logits(Device::kCuda, lp).ok());
  CUDA_CHECK(cudaDeviceSynchronize());
  float h_loss = NAN;
  std::vector<float> h_metrics(kNumMetrics, NAN);
  loss.download(&h_loss, sizeof(float));
  metrics.download(h_metrics.data(), metrics.bytes());
  EXPECT_EQ(h_loss, 0.0f);
  for (float m : h_metrics) EXPECT_EQ(m, 0.0f);
}

// --- Streams, determinism and CUDA graphs ----------------------------------------------------

// Everything a fused call wrote, as bytes, for bitwise comparisons.
std::vector<unsigned char> snapshot(const DeviceOutputs& o) {
  std::vector<unsigned char> all;
  for (const DeviceBuffer* b : {&o.loss, &o.lse, &o.metrics, &o.dx, &o.dw, &o.db}) {
    std::vector<unsigned char> part(b->bytes());
    b->download(part.data(), part.size());
    all.insert(all.end(), part.begin(), part.end());
  }
  return all;
}

// The memsets run on the legacy default stream, which a non-blocking stream does not wait for:
// finish them before the next call.
void poison(const DeviceOutputs& o) {
  for (const DeviceBuffer* b : {&o.loss, &o.lse, &o.metrics, &o.dx, &o.dw, &o.db}) b->poison();
  CUDA_CHECK(cudaDeviceSynchronize());
}

// A call on a user stream is bit-identical run to run (no atomics), and the same call captured in
// a CUDA graph in global capture mode (which rejects synchronization and allocation) replays to the
// same bits.
TEST(CudaStream, DeterministicAndGraphCapturable) {
  SKIP_WITHOUT_DEVICE();
  for (Strategy s : {Strategy::kGradInForward, Strategy::kRecompute}) {
    Case c;
    c.n = 300;
    c.v = 1000;
    c.d = 64;
    c.dtype = DType::kBFloat16;
    c.bias = true;
    c.grad_bias = true;
    c.options.label_smoothing = 0.1f;
    c.seed = 61;
    SCOPED_TRACE(c.describe() + " strategy " + strategy_name(s));
    const Inputs in = make_inputs(c);
    PlanChoice choice;
    choice.manual = true;
    choice.plan.strategy = s;
    choice.plan.forward_token_chunk = 128;
    choice.plan.dw_group_tokens = 128;
    choice.plan.backward_token_chunk = 128;
    choice.plan.backward_vocab_chunk = 256;
    const Plan plan = cuda_plan(c, choice);
    const DeviceInputs d = upload(c, in);
    const DeviceOutputs o = make_outputs(c);
    const DeviceBuffer fws(plan.forward_workspace_bytes), bws(plan.backward_workspace_bytes);
    cudaStream_t stream = nullptr;
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    // Uploads and poisoning ran on the legacy stream, which `stream` does not wait for.
    CUDA_CHECK(cudaDeviceSynchronize());
    auto call = [&]() -> Status {
      ForwardParams f = forward_params(c, in, d, o, plan);
      f.workspace = fws.get();
      f.workspace_bytes = fws.bytes();
      f.stream = stream;
      Status st = forward(Device::kCuda, f);
      if (!st.ok() || s != Strategy::kRecompute) return st;
      BackwardParams b = backward_params(c, in, d, o, plan);
      b.workspace = bws.get();
      b.workspace_bytes = bws.bytes();
      b.stream = stream;
      return backward(Device::kCuda, b);
    };

    Status st = call();
    ASSERT_TRUE(st.ok()) << st.message;
    CUDA_CHECK(cudaStreamSynchronize(stream));
    const std::vector<unsigned char> first = snapshot(o);
    poison(o);
    st = call();
    ASSERT_TRUE(st.ok()) << st.message;
    CUDA_CHECK(cudaStreamSynchronize(stream));
    EXPECT_TRUE(snapshot(o) == first) << "two eager runs differ";

    poison(o);
    CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    st = call();
    cudaGraph_t graph = nullptr;
    const cudaError_t end = cudaStreamEndCapture(stream, &graph);
    ASSERT_TRUE(st.ok()) << "during capture: " << st.message;
    ASSERT_EQ(end, cudaSuccess) << cudaGetErrorString(end);
    cudaGraphExec_t exec = nullptr;
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    CUDA_CHECK(cudaGraphLaunch(exec, stream));
    CUDA_CHECK(cudaStreamSynchronize(stream));
    EXPECT_TRUE(snapshot(o) == first) << "the graph replay differs from the eager run";
    CUDA_CHECK(cudaGraphExecDestroy(exec));
    CUDA_CHECK(cudaGraphDestroy(graph));
    CUDA_CHECK(cudaStreamDestroy(stream));

    Outputs out;
    out.plan = plan;
    out.has_grads = true;
    download(c, o, &out);
    expect_cuda_matches_reference(c, in, out);
  }
}

// --- N * V > 2^31 ----------------------------------------------------------------------------

// 17000 x 131072 logits (2.2e9 elements) in one forward block and in one dZ buffer, so every
// element offset past 2^31 is exercised. Too large for the full reference: sampled rows are
// checked in float64 (loss, lse, dx), and sampled columns of dW against a float64 sum that uses
// the (already checked) lse of every row. Needs about 10 GiB of device memory.
TEST(CudaEdge, BeyondInt32Elements) {
  SKIP_WITHOUT_DEVICE();
  Case c;
  c.n = 17000;
  c.v = 131072;
  c.d = 64;
  c.dtype = DType::kBFloat16;
  c.options.reduction = Reduction::kNone;
  c.ignore_fraction = 0.1;
  c.seed = 71;
  const int64_t n = c.n, v = c.v, dd = c.d;
  ASSERT_GT(n * v, int64_t(1) << 31);
  const Inputs in = make_inputs(c);
  PlanChoice choice;
  choice.manual = true;
  choice.plan.strategy = Strategy::kRecompute;
  choice.plan.forward_token_chunk = n;      // one [N, V] fp32 logits block
  choice.plan.backward_token_chunk = 8192;  // token blocks written into one [N, V] dZ buffer
  choice.plan.backward_vocab_chunk = v;
  Outputs out;
  ASSERT_TRUE(run_fused_cuda(c, in, choice, &out));

  for (int64_t i = 0; i < n; ++i) {
    ASSERT_TRUE(std::isfinite(out.lse[i]) && std::isfinite(out.loss[i])) << "row " << i;
  }
  const RefProblem& r = in.ref;
  auto logits_row = [&](int64_t i, std::vector<double>* z) {
    z->assign(v, 0.0);
    for (int64_t col = 0; col < v; ++col) {
      double s = 0.0;
      for (int64_t k = 0; k < dd; ++k) s += r.x[i * dd + k] * r.weight[col * dd + k];
      (*z)[col] = s;
    }
  };
  const int64_t rows[] = {0, 1, 4097, 8191, 8192, 12000, 16383, 16384, 16385, 16999};
  const double grad_tol = 3.0 / 256;  // bf16 dZ and bf16 output, per row of only D elements
  std::vector<double> z;
  for (int64_t i : rows) {
    logits_row(i, &z);
    double m = -INFINITY;
    for (double zz : z) m = std::max(m, zz);
    double se = 0.0;
    for (double zz : z) se += std::exp(zz - m);
    const double lse = m + std::log(se);
    const int64_t y = r.labels[i];
    const bool valid = y != c.options.ignore_index;
    EXPECT_NEAR(out.lse[i], lse, 2e-5 * std::max(1.0, std::abs(lse))) << "row " << i;
    const double loss = valid ? lse - z[y] : 0.0;
    EXPECT_NEAR(out.loss[i], loss, 2e-5 * std::max(1.0, std::abs(loss))) << "row " << i;
    std::vector<double> dx(dd, 0.0);
    if (valid) {
      const double g = in.grad_loss[i];
      for (int64_t col = 0; col < v; ++col) {
        const double dz = g * (std::exp(z[col] - lse) - (col == y ? 1.0 : 0.0));
        for (int64_t k = 0; k < dd; ++k) dx[k] += dz * r.weight[col * dd + k];
      }
    }
    std::vector<double> got(dd);
    for (int64_t k = 0; k < dd; ++k) got[k] = out.dx.get(i * dd + k);
    expect_close("dx row " + std::to_string(i), got, dx, grad_tol);
  }

  std::vector<int64_t> cols = {0, 1, v / 2, v - 1};
  for (int64_t i : {int64_t(3), int64_t(16500), int64_t(16998)}) {
    if (r.labels[i] != c.options.ignore_index) cols.push_back(r.labels[i]);  // a target column
  }
  for (int64_t col : cols) {
    std::vector<double> dw(dd, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t y = r.labels[i];
      if (y == c.options.ignore_index) continue;
      double zz = 0.0;
      for (int64_t k = 0; k < dd; ++k) zz += r.x[i * dd + k] * r.weight[col * dd + k];
      const double dz = in.grad_loss[i] * (std::exp(zz - out.lse[i]) - (col == y ? 1.0 : 0.0));
      for (int64_t k = 0; k < dd; ++k) dw[k] += dz * r.x[i * dd + k];
    }
    std::vector<double> got(dd);
    for (int64_t k = 0; k < dd; ++k) got[k] = out.dw.get(col * dd + k);
    expect_close("dW column " + std::to_string(col), got, dw, grad_tol);
  }
}

// fp32 logits [op.rows, op.cols] = x W^T of `op` (ld = op.cols): the unfused path's GEMM.
detail::GemmArgs logits_gemm_args(const detail::LogitsOperands& op, void* logits) {
  detail::GemmArgs g;
  g.m = op.rows;
  g.n = op.cols;
  g.k = op.hidden;
  g.a = op.x;
  g.lda = op.ldx;
  g.a_type = op.dtype;
  g.b = op.weight;
  g.ldb = op.ldw;
  g.b_type = op.dtype;
  g.trans_b = true;
  g.c = logits;
  g.ldc = op.cols;
  return g;
}

// The fused logits GEMMs against the GEMM + row kernel path, primitive by primitive, on a bf16
// block of several partial CTA tiles: every dZ element and every partial statistic is written
// (the outputs start as NaN), and both paths agree. Runs where the fused GEMMs can (CUTLASS built
// in, compute capability 9.0), and checks they are taken exactly there and for exactly the
// options they serve. The hidden sizes lie below and above kFusedPingpongMaxHidden, so both kernel
// shapes (ping-pong and cooperative consumers) run.
class CudaFusedLogits : public ::testing::TestWithParam<int64_t> {};
static_assert(72 < detail::cuda::kFusedPingpongMaxHidden &&
                  2056 >= detail::cuda::kFusedPingpongMaxHidden,
              "the test's hidden sizes pick one kernel shape each");

TEST_P(CudaFusedLogits, MatchUnfusedPrimitivesAndWriteEveryElement) {
  SKIP_WITHOUT_DEVICE();
  Case c;
  c.n = 300;
  c.v = 1000;
  c.d = GetParam();
  c.dtype = DType::kBFloat16;
  fusable_options(c);
  c.options.reduction = Reduction::kSum;
  const Inputs in = make_inputs(c);
  const DeviceInputs d = upload(c, in);
  const int64_t n = c.n, v = c.v;
  const int64_t t0 = 5, rows = n - t0, v0 = 200, cols = v - v0;  // an offset block

  DeviceBuffer scratch(detail::cuda_traits().gemm_scratch_bytes);
  auto be = detail::make_cuda_backend(nullptr, false, scratch.get(), scratch.bytes());
  ASSERT_TRUE(be);
  detail::LogitsOperands op;
  op.x = static_cast<const char*>(d.x.raw()) + t0 * in.x_stride * 2;
  op.ldx = in.x_stride;
  op.weight = static_cast<const char*>(d.weight.raw()) + v0 * c.d * 2;
  op.ldw = c.d;
  op.dtype = c.dtype;
  op.rows = rows;
  op.cols = cols;
  op.hidden = c.d;

  // The statistics block's arguments (the run below sets its columns and outputs).
  detail::RowForwardArgs rf;
  rf.rows = rows;
  rf.cols = cols;
  rf.col_offset = v0;
  rf.vocab_size = v;
  rf.row_offset = t0;
  rf.labels = d.labels.raw();
  rf.label_type = in.label_type();
  rf.options = c.options;

  int device = 0, major = 0, minor = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  const bool expected = FLCE_WITH_CUTLASS && major == 9 && minor == 0;
  ASSERT_EQ(be->fused_stats(op, rf), expected);
  if (!expected) GTEST_SKIP() << "no fused logits GEMMs on this build or device";
  detail::LogitsOperands other = op;
  other.dtype = DType::kFloat32;
  EXPECT_FALSE(be->fused_stats(other, rf)) << "fp32 inputs take the cuBLASLt path";
  other = op;
  other.ldx = in.x_stride + 1;
  EXPECT_FALSE(be->fused_stats(other, rf)) << "TMA needs row pitches of 16 bytes";
  other = op;
  other.x = static_cast<const char*>(op.x) + 2;
  EXPECT_FALSE(be->fused_stats(other, rf)) << "TMA needs 16-byte aligned operands";
  {
    detail::RowForwardArgs o = rf;
    o.bias = d.x.raw();
    EXPECT_FALSE(be->fused_stats(op, o)) << "bias takes the row kernels";
    o = rf;
    o.options.softcap = 5.0f;
    EXPECT_FALSE(be->fused_stats(op, o)) << "soft-capping takes the row kernels";
    o = rf;
    o.row_metrics = static_cast<float*>(d.x.raw());
    EXPECT_FALSE(be->fused_stats(op, o)) << "metrics take the row kernels";
    o = rf;
    o.class_weight = static_cast<const float*>(d.x.raw());
    EXPECT_FALSE(be->fused_stats(op, o)) << "class-weighted smoothing takes the row kernels";
    o.options.label_smoothing = 0.0f;
    EXPECT_TRUE(be->fused_stats(op, o)) << "class weights without smoothing stay fused";
  }

  DeviceBuffer scalars(sizeof(float) * detail::kNumScalars);
  detail::PrepareArgs prep;
  prep.labels = d.labels.raw();
  prep.label_type = in.label_type();
  prep.class_weight = nullptr;
  prep.num_tokens = n;
  prep.vocab_size = v;
  prep.ignore_index = c.options.ignore_index;
  prep.scalars = static_cast<float*>(scalars.raw());
  ASSERT_TRUE(be->prepare(prep).ok());

  // Statistics of the block, both ways, finished through a carry as a split forward does.
  const int64_t tiles = (cols + detail::cuda::kFusedTileCols - 1) / detail::cuda::kFusedTileCols;
  DeviceBuffer logits(sizeof(float) * rows * cols);
  DeviceBuffer partials(sizeof(detail::RowState) * rows * tiles), target_z(sizeof(float) * rows);
  std::vector<std::vector<float>> lse(2), loss(2);
  for (int fused = 0; fused < 2; ++fused) {
    DeviceBuffer row_loss(sizeof(float) * n), lse_out(sizeof(float) * n),
        carry(sizeof(detail::RowCarry) * n);
    // Rows' first 200 columns: through the unfused path in both runs, as the carry's start.
    rf.cols = v0;
    rf.col_offset = 0;
    rf.partials = nullptr;
    rf.partials_ld = 0;
    rf.target_z = nullptr;
    rf.scalars = static_cast<const float*>(scalars.raw());
    rf.row_loss = static_cast<float*>(row_loss.raw());
    rf.lse = static_cast<float*>(lse_out.raw());
    rf.carry = static_cast<detail::RowCarry*>(carry.raw());
    detail::LogitsOperands head = op;  // the rows' columns [0, v0)
    head.weight = d.weight.raw();
    head.cols = v0;
    ASSERT_TRUE(be->gemm(logits_gemm_args(head, logits.raw())).ok());
    rf.logits = logits.raw();
    rf.ld = v0;
    rf.cols = v0;
    ASSERT_TRUE(be->rows_forward(rf).ok());
    rf.col_offset = v0;
    rf.cols = cols;
    if (fused) {
      partials.poison();
      target_z.poison();
      rf.logits = nullptr;
      rf.partials = static_cast<detail::RowState*>(partials.raw());
      rf.partials_ld = tiles;
      rf.target_z = static_cast<float*>(target_z.raw());
      ASSERT_TRUE(be->logits_stats(op, rf).ok());
      CUDA_CHECK(cudaDeviceSynchronize());
      std::vector<detail::RowState> got(rows * tiles);
      partials.download(got.data(), partials.bytes());
      for (int64_t i = 0; i < rows * tiles; ++i) {
        ASSERT_TRUE(std::isfinite(got[i].max) && got[i].sum_exp >= 1.0f)
            << "partial " << i << " (row " << i / tiles << ", tile " << i % tiles
            << ") not written";
      }
    } else {
      ASSERT_TRUE(be->gemm(logits_gemm_args(op, logits.raw())).ok());
      rf.ld = cols;
    }
    ASSERT_TRUE(be->rows_forward(rf).ok());
    CUDA_CHECK(cudaDeviceSynchronize());
    lse[fused].assign(n, NAN);
    loss[fused].assign(n, NAN);
    lse_out.download(lse[fused].data(), lse_out.bytes());
    row_loss.download(loss[fused].data(), row_loss.bytes());
  }
  for (int64_t i = t0; i < n; ++i) {
    ASSERT_TRUE(std::isfinite(lse[1][i]) && std::isfinite(loss[1][i])) << "row " << i;
    EXPECT_NEAR(lse[1][i], lse[0][i], 1e-5 * std::max(1.0f, std::abs(lse[0][i]))) << "row " << i;
    EXPECT_NEAR(loss[1][i], loss[0][i], 1e-5 * std::max(1.0f, std::abs(loss[0][i]))) << "row " << i;
  }

  // dZ of the block from those LSEs, both ways; the fused one into NaN.
  detail::RowGradArgs rg;
  rg.rows = rows;
  rg.cols = cols;
  rg.row_offset = t0;
  rg.col_offset = v0;
  rg.vocab_size = v;
  rg.labels = d.labels.raw();
  rg.label_type = in.label_type();
  rg.options = c.options;
  rg.scalars = static_cast<const float*>(scalars.raw());
  DeviceBuffer lse_in = to_device(lse[0]);
  rg.lse = static_cast<const float*>(lse_in.raw());
  rg.grad_loss = static_cast<const float*>(d.grad_loss.raw());
  rg.dz_type = c.dtype;
  // A pitch of its own, a multiple of 8 (the fused dZ is stored 16 bytes at a time).
  rg.ldz = cols + 8;
  std::vector<TypedBuffer> dz(2, TypedBuffer(c.dtype, rows * rg.ldz));
  for (int fused = 0; fused < 2; ++fused) {
    DeviceBuffer out(2 * rows * rg.ldz);
    rg.dz = out.raw();
    if (fused) {
      ASSERT_TRUE(be->logits_grad(op, rg).ok());
    } else {
      ASSERT_TRUE(be->gemm(logits_gemm_args(op, logits.raw())).ok());
      rg.logits = static_cast<const float*>(logits.raw());
      rg.ld = cols;
      ASSERT_TRUE(be->rows_grad(rg).ok());
    }
    CUDA_CHECK(cudaDeviceSynchronize());
    out.download(dz[fused].data(), out.bytes());
    EXPECT_TRUE(out.canary_intact());
  }
  double max_ref = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j)
      max_ref = std::max(max_ref, std::abs(dz[0].get(i * rg.ldz + j)));
  }
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const double got = dz[1].get(i * rg.ldz + j), ref = dz[0].get(i * rg.ldz + j);
      ASSERT_TRUE(std::isfinite(got)) << "dZ[" << i << ", " << j << "] not written";
      // Both round to bf16 (2^-8 relative); the GEMMs differ only in summation order.
      ASSERT_NEAR(got, ref, 1e-2 * std::abs(ref) + 1e-3 * max_ref)
          << "dZ[" << i << ", " << j << "]";
    }
  }
}
INSTANTIATE_TEST_SUITE_P(Cuda, CudaFusedLogits, ::testing::Values<int64_t>(72, 2056),
                         [](const ::testing::TestParamInfo<int64_t>& info) {
                           return "d" + std::to_string(info.param);
                         });

}  // namespace
}  // namespace flce::test

#endif  // FLCE_WITH_CUDA
