// cross_entropy_logits (the no-GEMM path) on the CPU against the float64 reference. The
// reference takes x W^T, so the logits are fed as x with W = I: its dx is then dL/dlogits.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "harness.h"

namespace flce::test {
namespace {

struct LogitsCase {
  std::string name;
  Case c;           // n, v, dtype, options, class_weights, int32_labels, grad_lse (d is ignored)
  int64_t pad = 0;  // logits row stride = v + pad
  bool grad = true;
  bool in_place = false;  // grad_logits aliases logits
  bool grad_scale = true;
};

void PrintTo(const LogitsCase& p, std::ostream* os) { *os << p.name; }

std::vector<LogitsCase> logits_cases() {
  std::vector<LogitsCase> out;
  uint64_t seed = 500;
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (Reduction r : {Reduction::kMean, Reduction::kSum, Reduction::kNone}) {
      LogitsCase l;
      l.c.n = 29;
      l.c.v = 157;
      l.c.dtype = t;
      l.c.options.reduction = r;
      l.c.seed = ++seed;
      l.name = std::string(dtype_name(t)) + "_" +
               (r == Reduction::kMean  ? "mean"
                : r == Reduction::kSum ? "sum"
                                       : "none");
      out.push_back(l);
      l.name += "_all_options_in_place";
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
      out.push_back(l);
    }
  }
  LogitsCase l;
  l.c.n = 23;
  l.c.v = 131;
  l.c.seed = ++seed;
  l.grad = false;
  l.name = "no_grad";
  out.push_back(l);
  l.grad = true;
  l.grad_scale = false;
  l.name = "no_grad_scale";
  out.push_back(l);
  l.c.all_ignored = true;
  l.name = "all_ignored";
  out.push_back(l);
  return out;
}

class Logits : public ::testing::TestWithParam<LogitsCase> {};

TEST_P(Logits, MatchesReference) {
  const LogitsCase& p = GetParam();
  Case c = p.c;
  c.d = c.v;
  SCOPED_TRACE(c.describe());
  Inputs in = make_inputs(c);  // its x holds the logits' values; W is replaced by I
  const int64_t n = c.n, v = c.v, ld = v + p.pad;
  TypedBuffer logits(c.dtype, n * ld);
  logits.poison();
  RefProblem ref = in.ref;
  ref.d = v;
  ref.weight.assign(v * v, 0.0);
  for (int64_t j = 0; j < v; ++j) ref.weight[j * v + j] = 1.0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < v; ++j) logits.set(i * ld + j, 2.5 * ref.x[i * v + j]);
    for (int64_t j = 0; j < v; ++j) ref.x[i * v + j] = logits.get(i * ld + j);
  }

  std::vector<float> loss(c.options.reduction == Reduction::kNone ? n : 1, NAN);
  std::vector<float> lse(n, NAN), metrics(kNumMetrics, NAN);
  TypedBuffer grad(c.dtype, n * ld);
  grad.poison();
  std::vector<float> scale =
      c.options.reduction == Reduction::kNone ? in.grad_loss : std::vector<float>{0.6f};

  LogitsParams lp;
  lp.logits = logits.data();
  lp.logits_row_stride = ld;
  lp.labels = in.labels();
  lp.label_type = in.label_type();
  lp.class_weight = c.class_weights ? in.class_weight.data() : nullptr;
  lp.num_tokens = n;
  lp.vocab_size = v;
  lp.dtype = c.dtype;
  lp.options = c.options;
  lp.loss = loss.data();
  lp.lse = lse.data();
  lp.metrics = metrics.data();
  if (p.grad) {
    lp.grad_logits = p.in_place ? logits.data() : grad.data();
    lp.grad_row_stride = ld;
    lp.grad_scale = p.grad_scale ? scale.data() : nullptr;
    lp.grad_lse = c.grad_lse ? in.grad_lse.data() : nullptr;
  }
  Workspace ws(logits_workspace_bytes(n));
  lp.workspace = ws.data();
  lp.workspace_bytes = ws.bytes();
  const Status s = cross_entropy_logits(Device::kCpu, lp);
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_TRUE(ws.canary_intact());

  const RefForward f = reference_forward(ref);
  const Tolerance tol = tolerance_for(c.dtype);
  if (c.options.reduction == Reduction::kNone) {
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_NEAR(loss[i], f.row_loss[i], tol.loss * std::max(1.0, std::abs(f.row_loss[i])));
    }
  } else {
    EXPECT_NEAR(loss[0], f.loss, tol.loss * std::max(1.0, std::abs(f.loss)));
  }
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_NEAR(lse[i], f.lse[i], tol.loss * std::max(1.0, std::abs(f.lse[i]))) << "row " << i;
  }
  EXPECT_EQ(metrics[kMetricValidTokens], f.metrics[kMetricValidTokens]);
  EXPECT_NEAR(metrics[kMetricMaxLogit], f.metrics[kMetricMaxLogit], 1e-4);
  EXPECT_NEAR(metrics[kMetricEntropy], f.metrics[kMetricEntropy], 1e-4);
  if (!p.grad) return;

  RefUpstream up;
  if (p.grad_scale) {
    up.grad_loss.assign(scale.begin(), scale.end());
  } else {
    up.grad_loss.assign(c.options.reduction == Reduction::kNone ? n : 1, 1.0);
  }
  up.grad_lse.assign(lp.grad_lse ? in.grad_lse.begin() : in.grad_lse.end(), in.grad_lse.end());
  const RefGrads g = reference_backward(ref, up);
  const TypedBuffer& got = p.in_place ? logits : grad;
  std::vector<double> dense(n * v);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < v; ++j) dense[i * v + j] = got.get(i * ld + j);
    // Padding between rows is never written.
    for (int64_t j = v; j < ld; ++j) EXPECT_TRUE(std::isnan(got.get(i * ld + j)));
  }
  // dZ is rounded once into the dtype: element-wise half an ulp.
  expect_close("grad_logits", dense, g.dx, tol.grad);
}

INSTANTIATE_TEST_SUITE_P(Cpu, Logits, ::testing::ValuesIn(logits_cases()),
                         [](const ::testing::TestParamInfo<LogitsCase>& i) {
                           return i.param.name;
                         });

TEST(LogitsEdge, ZeroTokens) {
  std::vector<float> loss(1, NAN), metrics(kNumMetrics, NAN);
  const int64_t labels = 0;
  LogitsParams lp;
  lp.labels = &labels;
  lp.num_tokens = 0;
  lp.vocab_size = 10;
  lp.logits_row_stride = 10;
  lp.loss = loss.data();
  lp.metrics = metrics.data();
  Workspace ws(logits_workspace_bytes(0));
  lp.workspace = ws.data();
  lp.workspace_bytes = ws.bytes();
  ASSERT_TRUE(cross_entropy_logits(Device::kCpu, lp).ok());
  EXPECT_EQ(loss[0], 0.0f);
  for (float m : metrics) EXPECT_EQ(m, 0.0f);
}

}  // namespace
}  // namespace flce::test
